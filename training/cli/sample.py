"""``kaem-sample``: the parser and a thin ``main`` over :mod:`training.sample`."""

from __future__ import annotations

import argparse
import sys

from training.cli import HelpFormatter, UserError, command, resolve_device
from training.sample import write_samples
from training.uniforms import parse_seeds


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


@command
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
