"""``kaem-train-features``: the parser and a thin ``main`` over :mod:`training.eval.features`."""

from __future__ import annotations

import argparse
import sys
import time

from training.cli import HelpFormatter, UserError, command, resolve_device
from training.eval.features import CLASSES, save_feature_net, train_feature_net


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-train-features",
        description="Train and freeze the small CNN classifier whose penultimate features define the classifier "
        "metrics of kaem-eval (FD-clf, KID-clf, precision/recall). These are not FID: never compare them with "
        "published FID numbers.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", default="fmnist", help=f"dataset with labels: {', '.join(CLASSES)}")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the project's data/ folder)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training split")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--out", default=None, help="file to write (default: features/<dataset>.pt)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset not in CLASSES:
        raise UserError(f"--dataset {args.dataset!r} has no labels here; choose one of: {', '.join(CLASSES)}")
    if args.epochs < 1 or args.batch < 1:
        raise UserError("--epochs and --batch must be >= 1")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    net, acc = train_feature_net(args.dataset, args.data_root, args.epochs, args.batch, args.lr, args.seed, device,
                                 progress=not args.no_progress)
    out = save_feature_net(args.out or f"features/{args.dataset}.pt", net, args.dataset, acc, args.epochs, args.seed)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {args.dataset} classifier, {args.epochs} epoch(s), "
          f"test accuracy {acc:.2%}, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
