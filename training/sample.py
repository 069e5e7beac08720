"""Eager sampling and ``kaem-sample``: seeds → uniforms (the shared counter-based generator) →
one forward pass → uint8 images → PNG grid. The served graph reproduces these pixels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from training import uniforms
from training.checkpoint import load_model
from training.images import save_each, save_grid
from training.model.kaem import KAEM, LatentImageModel, to_uint8_nhwc
from training.model.prior import BucketLookup


def u_for_model(model: LatentImageModel, seeds: Iterable[int], truncation: float = 1.0) -> np.ndarray:
    """The model's ``u[N, D]`` for these seeds. KAEM: truncation on the ITS uniforms only; the
    baselines' uniforms become Gaussian noise and take no truncation."""
    if not isinstance(model, KAEM):
        if truncation != 1.0:
            raise ValueError("--truncation applies to KAEM's inverse-transform prior only")
        return uniforms.seeds_to_u(list(seeds), model.noise_dim, 0)
    p = model.cfg.prior
    return uniforms.seeds_to_u(list(seeds), *uniforms.u_layout(p.kind, p.P, p.Q), truncation)


@torch.no_grad()
def sample_images(model: LatentImageModel, seeds: Iterable[int], truncation: float = 1.0,
                  batch: int = 256) -> np.ndarray:
    """uint8 images ``[N, H, W, C]`` for the given seeds (eager PyTorch, no decoder noise): KAEM in one
    pass, the VAE through its Gaussian prior, the latent EBM through its Langevin prior chain."""
    u = torch.from_numpy(u_for_model(model, seeds, truncation))
    dev = next(model.parameters()).device
    if isinstance(model, KAEM):  # the served graph's lookup: the binary search's index, ~1.4x faster eagerly
        lookup = BucketLookup(model.prior.cdf_table(), model.prior.knots)
        gen = lambda v: model.generate(v, lookup=lookup)  # noqa: E731
    else:
        gen = model.generate
    out = [to_uint8_nhwc(gen(u[i : i + batch].to(dev))).cpu() for i in range(0, len(u), batch)]
    return torch.cat(out).numpy()


def write_samples(checkpoint: str | Path, seeds: Iterable[int], out: str | Path, truncation: float = 1.0,
                  out_dir: str | Path | None = None, device: str = "cpu") -> Path:
    model, _ = load_model(checkpoint, map_location=device)
    seeds = list(seeds)
    images = sample_images(model, seeds, truncation)
    if out_dir is not None:
        save_each(images, out_dir, seeds)
    return save_grid(images, out, upscale=max(1, 64 // images.shape[1]))
