"""Evaluation: latent health, feature-space metrics, comparisons, prior plots."""
