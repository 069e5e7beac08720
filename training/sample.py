"""Eager sampling and ``kaem-sample``: seeds → uniforms (the shared counter-based generator) →
one forward pass → uint8 images → PNG grid. The served graph reproduces these pixels."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from training import uniforms
from training.checkpoint import CheckpointError, load_model
from training.cli import HelpFormatter, UserError, resolve_device, user_errors
from training.images import save_each, save_grid, to_uint8_nhwc
from training.model.kaem import KAEM, LatentImageModel
from training.model.prior import BucketLookup
from training.uniforms import parse_seeds


def seeds_to_u(model: LatentImageModel, seeds: Iterable[int], truncation: float = 1.0) -> np.ndarray:
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
    u = torch.from_numpy(seeds_to_u(model, seeds, truncation))
    dev = next(model.parameters()).device
    if isinstance(model, KAEM):  # the served graph's lookup: the binary search's index, ~1.4x faster eagerly
        lookup = BucketLookup(model.prior.cdf_table())
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-sample",
        description="Generate images from a checkpoint in eager PyTorch. A seed becomes uniforms through the "
        "versioned counter-based generator shared with the serving client, so a seed gives the same image here, "
        "in onnxruntime and through Triton.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file or a run directory (latest checkpoint)")
    p.add_argument("--seeds", default="0-63", help="image seeds: '0-63', '7' or '0-9,100'")
    p.add_argument("--truncation", type=float, default=1.0,
                   help="quantile truncation T in (0, 1]: u' = 0.5 + T(u - 0.5) on ITS uniforms; 1 = off")
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--out-dir", default=None, help="also write one PNG per seed into this folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return p


@user_errors(ValueError, CheckpointError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if not 0.0 < args.truncation <= 1.0:
        raise UserError(f"--truncation must be in (0, 1], got {args.truncation}")
    device = resolve_device(args.device)
    path = write_samples(args.checkpoint, seeds, args.out, args.truncation, args.out_dir, str(device))
    print(f"wrote {len(seeds)} images to {path}" + (f" and {args.out_dir}/" if args.out_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
