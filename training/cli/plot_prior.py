"""``kaem-plot-prior``: the parser and a thin ``main`` over :mod:`training.eval.plot_prior`."""

from __future__ import annotations

import argparse
import sys

from training.checkpoint import load_model
from training.cli import HelpFormatter, UserError, command
from training.eval.plot_prior import describe_structure, plot_priors, prior_structure


def _pair(text: str) -> tuple[int, int]:
    try:
        q, p = (int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"component {text!r}: use q,p with 1-based integers, e.g. 1,2") from err
    return q, p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-plot-prior",
        description="Plot learned univariate prior densities (normalised by quadrature) against the reference "
        "measure π₀, one row per checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint file or run directory; repeat for several rows")
    p.add_argument("--out", default="priors.png", help="PNG to write")
    p.add_argument("--n", type=int, default=4, help="components per row (those with the largest KL to π₀)")
    p.add_argument("--component", type=_pair, action="append", default=None,
                   help="explicit 1-based component q,p (repeatable); overrides --n")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be >= 1")
    path = plot_priors(args.checkpoint, args.out, args.n, args.component)
    print(f"wrote {path}")
    for ckpt in args.checkpoint:
        print(f"{ckpt}:")
        for line in describe_structure(prior_structure(load_model(ckpt, kaem_only=True)[0])):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
