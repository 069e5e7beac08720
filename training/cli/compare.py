"""``kaem-compare``: the parser and a thin ``main`` over :mod:`training.compare`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.cli import HelpFormatter, UserError, command, resolve_device
from training.compare import compare
from training.config import MODELS, POSTERIOR_KINDS, PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-compare",
        description="Train (or reuse) KAEM and its VAE and latent-EBM baselines on one data set with the same "
        "harness and budget (equal updates with --steps, equal wall clock with --minutes), score them with "
        "classifier-space FD/KID/precision/recall (kaem-eval), latent health and sampling speed, and write a "
        "markdown table (comparison.md) and comparison.json into --out. Needs the data set's feature classifier "
        "(kaem-train-features).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default="fmnist", help=f"data set preset: {', '.join(PRESETS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="updates per model (equal updates; default 1000)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training minutes per model (equal time; schedules sized to the steps "
                        "that fit)")
    p.add_argument("--lr-sweep", action="store_true",
                   help="with --minutes: first train each baseline at x0.3, x1, x3 of its preset lr for M/4 minutes "
                   "and keep the lowest FD-clf")
    p.add_argument("--lr-from", default=None, metavar="COMPARISON_JSON",
                   help="reuse the lr factors chosen by another comparison's sweep (e.g. Fashion-MNIST's for MNIST)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--posterior", choices=POSTERIOR_KINDS, default=None, help="KAEM's estimator (default: preset's)")
    p.add_argument("--n", type=int, default=2000, help="generated and real images per metric")
    p.add_argument("--sweep-n", type=int, default=2000, help="images per metric in the lr sweep's runs")
    p.add_argument("--features", default=None, help="classifier file (default: features/<dataset>.pt)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the project's data/)")
    p.add_argument("--out", default=None, help="folder for the runs and the table (default: runs/compare-<preset>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise UserError(f"--models: unknown {unknown or 'empty list'}; choose from {', '.join(MODELS)}")
    steps = args.steps if args.steps is not None or args.minutes is not None else 1000
    if (steps is not None and steps < 1) or (args.minutes is not None and args.minutes <= 0) or args.n < 2:
        raise UserError("--steps must be >= 1, --minutes > 0 and --n >= 2")
    if (args.lr_sweep or args.lr_from) and args.minutes is None:
        raise UserError("--lr-sweep and --lr-from go with --minutes (the sweep runs at M/4 minutes)")
    if args.lr_sweep and args.lr_from:
        raise UserError("--lr-sweep and --lr-from exclude each other: sweep here, or reuse another sweep")
    if args.lr_from and not Path(args.lr_from).is_file():
        raise UserError(f"--lr-from: {args.lr_from} not found (a comparison.json written by kaem-compare --lr-sweep)")
    cmdline = "kaem-compare " + " ".join(sys.argv[1:] if argv is None else argv)
    _, table = compare(args.preset, steps, Path(args.out or f"runs/compare-{args.preset}"), models, args.n,
                       args.posterior, args.data_root, args.features, resolve_device(args.device),
                       not args.no_progress, cmdline, minutes=args.minutes, lr_sweep=args.lr_sweep,
                       lr_from=args.lr_from, sweep_n=args.sweep_n)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
