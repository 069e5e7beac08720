"""Posterior-sampling kernels (pure functions of their inputs and a generator)."""
