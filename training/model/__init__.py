"""The model: KAN univariate functions, the energy prior, decoders, the KAEM and the baselines."""
