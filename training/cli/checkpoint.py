"""``python -m training.checkpoint slim SRC DST``: a model-only copy of a checkpoint (the shipped default's form)."""

from __future__ import annotations

import argparse
import sys

from training.checkpoint import slim_copy
from training.cli import command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.checkpoint",
                                description="Checkpoint utilities. 'slim SRC DST' keeps the model weights only.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slim", help="write a model-only copy of SRC (file or run directory) to DST")
    s.add_argument("src")
    s.add_argument("dst")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = slim_copy(args.src, args.dst)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
