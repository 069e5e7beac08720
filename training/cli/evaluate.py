"""``kaem-eval``: the parser and a thin ``main`` over :mod:`training.eval.evaluate`."""

from __future__ import annotations

import argparse
import sys
import time

from training.checkpoint import load_model
from training.cli import HelpFormatter, UserError, command, resolve_device
from training.eval import metrics
from training.eval.evaluate import details, evaluate, summary, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-eval",
        description="Evaluate a checkpoint's samples against its dataset's test split: Fréchet distance, KID and "
        "precision/recall in a frozen classifier's feature space (FD-clf etc.; not FID, not comparable with "
        "published FID), plus real FID/KID when you supply the Inception weight file, and their n = ∞ "
        "extrapolations with --infinity. Writes a JSON report and prints one summary line.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file or a run directory (latest checkpoint)")
    p.add_argument("--n", type=int, default=10_000, help="generated images (and real test images, at most all)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the project's data/ folder)")
    p.add_argument("--features", default=None, help="classifier file from kaem-train-features "
                   "(default: features/<dataset>.pt)")
    p.add_argument("--inception-weights", default=None,
                   help=f"local {metrics.INCEPTION_FILE} (pytorch-fid's) to add FID/KID; never downloaded")
    p.add_argument("--infinity", action="store_true",
                   help="add FD∞/KID∞: metrics on random subsets n = 1000, 1200, ..., 3000 of the generated "
                   "images (scaled down for smaller --n) vs all real ones, extrapolated linearly in 1/n")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subset pairs")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (capped at --n)")
    p.add_argument("--batch", type=int, default=256, help="images per generation / feature batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="first generator seed (seeds seed..seed+n-1); also picks "
                   "the real subset and KID subsets")
    p.add_argument("--no-ladder", action="store_true",
                   help="skip the blur ladder (real training images blurred by 0, 0.7, 1 and 1.5 px, scored the "
                   "same way: the scale every number is read against)")
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 4:
        raise UserError(f"--n must be >= 4 (precision/recall use 3 nearest neighbours), got {args.n}")
    if args.batch < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UserError("--batch and --kid-subsets must be >= 1, --kid-subset-size >= 2")
    if args.infinity:
        metrics.infinity_ns(args.n)  # ValueError (exit 2) when --n is too small for the fit
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, ckpt = load_model(args.checkpoint, map_location=device)
    report = {"checkpoint": ckpt["path"], "step": int(ckpt["step"]), "preset": model.cfg.preset}
    report.update(evaluate(model, model.cfg.train.dataset, args.n, data_root=args.data_root,
                           features=args.features, inception_weights=args.inception_weights,
                           infinity=args.infinity, batch=args.batch, device=device, seed=args.seed,
                           kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                           ladder=not args.no_ladder, progress=not args.no_progress))
    report["wall_s"]["total"] = round(time.perf_counter() - t0, 3)
    out = write_json(report, args.out)
    print(f"{summary(report)} -> {out}")
    for line in details(report):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
