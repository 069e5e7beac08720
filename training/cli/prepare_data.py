"""``kaem-prepare-data``: the parser and a thin ``main`` over :mod:`training.data.prepare`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.cli import command
from training.data import prepare
from training.data.prepare import PREPARE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaem-prepare-data", description=prepare.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None,
                   help="data folder to fill (default: $KAEM_DATA_ROOT if set, else <project>/data)")
    p.add_argument("--only", choices=tuple(PREPARE), default=None,
                   help="prepare one dataset only (default: both)")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.root
    if root is None:
        from training.data.datasets import default_data_root  # deferred: it imports torch

        root = default_data_root()
    try:
        for name in (args.only,) if args.only else tuple(PREPARE):
            PREPARE[name](root, root / ".cache")
    except OSError as err:
        raise prepare.PrepareError(f"cannot write under {root}: {err}") from err
    except KeyboardInterrupt:
        print("interrupted: run kaem-prepare-data again (unfinished files were left as *.part)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
