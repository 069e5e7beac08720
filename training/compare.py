"""``kaem-compare``: KAEM against its baselines (VAE, latent EBM) on one data set, trained by the same
harness with the same data, decoder, likelihood and number of updates, then scored with the same
classifier-space metrics and timed generating images. Writes ``comparison.md`` and ``comparison.json``.

A model whose run folder already holds a checkpoint at the requested step is loaded, not retrained;
a shorter one is resumed. So re-running after a crash or with another ``--n`` costs only evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from training.baselines import MODEL_NAMES
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model
from training.cli import HelpFormatter, UserError, resolve_device, user_errors
from training.config import MODELS, POSTERIOR_KINDS, PRESETS, get_preset, with_model, with_overrides

COLUMNS = ("model", "updates", "train time", "FD-clf ↓", "KID-clf ↓", "precision-clf ↑", "recall-clf ↑",
           "sampling img/s ↑")


def train_or_load(cfg, run_dir: Path, data_root: str | None, device: torch.device, progress: bool) -> Path:
    """The run's checkpoint at ``cfg.train.steps``: reused if present, resumed if shorter, else trained."""
    from training.train import train

    latest = latest_checkpoint(run_dir)
    if latest is not None:
        step = int(load_checkpoint(latest)["step"])
        if step >= cfg.train.steps:
            print(f"{run_dir}: reusing {latest.name} (step {step})", file=sys.stderr)
            return latest
    return train(cfg, run_dir, device, data_root, resume=latest is not None, progress=progress)


def sampling_speed(model, n: int = 1024, batch: int = 256) -> float:
    """Images/s of eager generation (seeds → images, uint8) after one warm-up batch."""
    from training.sample import sample_images

    sample_images(model, range(batch), batch=batch)
    t0 = time.perf_counter()
    sample_images(model, range(n), batch=batch)
    return n / (time.perf_counter() - t0)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Data set **{meta['dataset']}** (preset `{meta['preset']}`), {meta['steps']} updates of batch "
        f"{meta['batch_size']} per model, {meta['n']} generated vs {meta['n']} test images, classifier "
        f"`{meta['features']}` (test accuracy {meta['classifier_accuracy']:.1%}). FD-clf/KID-clf are Fréchet "
        "distance and KID in that classifier's feature space, not FID. Device: "
        f"{meta['device']}, {meta['threads']} torch threads.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['updates']} | {r['train_seconds'] / 60:.1f} min | {r['fd_clf']:.2f} | "
            f"{r['kid_clf']:.4f} | {r['precision_clf']:.3f} | {r['recall_clf']:.3f} | {r['images_per_s']:.0f} |"
        )
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def compare(preset: str, steps: int, out: Path, models: list[str], n: int, posterior: str | None = None,
            data_root: str | None = None, features: str | None = None, device: str = "cpu",
            progress: bool = True, command: str = "") -> tuple[list[dict[str, Any]], str]:
    from training.evaluate import evaluate

    dev = resolve_device(device)
    base = with_overrides(get_preset(preset), steps=steps)
    if posterior is not None:
        base = replace(base, posterior=replace(base.posterior, kind=posterior))
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for name in models:
        cfg = with_model(base, name)
        ckpt_path = train_or_load(cfg, out / name, data_root, dev, progress)
        model, ckpt = load_model(ckpt_path, map_location=dev)
        report = evaluate(model, cfg.train.dataset, n, data_root=data_root, features=features, device=dev,
                          ladder=False, progress=progress)  # the table's numbers only; kaem-eval adds the ladder
        label = MODEL_NAMES[name] + (f" ({cfg.posterior.kind.upper()})" if name == "kaem" else "")
        rows.append({
            "model": name, "name": label, "checkpoint": str(ckpt_path), "updates": int(ckpt["step"]),
            "train_seconds": float(ckpt["train_state"].get("train_seconds", float("nan"))),
            "images_per_s": sampling_speed(model),
            **{k: report[k] for k in ("fd_clf", "kid_clf", "kid_clf_std", "precision_clf", "recall_clf")},
        })
        meta = {"dataset": cfg.train.dataset, "preset": preset, "steps": steps, "batch_size": cfg.train.batch_size,
                "n": report["n"], "features": report["classifier"]["path"],
                "classifier_accuracy": report["classifier"]["test_accuracy"], "device": str(dev),
                "threads": torch.get_num_threads(), "command": command}
    table = markdown(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-compare",
        description="Train (or reuse) KAEM and its VAE and latent-EBM baselines on one data set with the same "
        "harness and number of updates, score them with classifier-space FD/KID/precision/recall (kaem-eval) and "
        "their sampling speed, and write a markdown table (comparison.md) and comparison.json into --out. "
        "Needs the data set's feature classifier (kaem-train-features).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default="fmnist", help=f"data set preset: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=1000, help="updates per model (the equal training budget)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--posterior", choices=POSTERIOR_KINDS, default=None, help="KAEM's estimator (default: preset's)")
    p.add_argument("--n", type=int, default=2000, help="generated and real images per metric")
    p.add_argument("--features", default=None, help="classifier file (default: features/<dataset>.pt)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the project's data/)")
    p.add_argument("--out", default=None, help="folder for the runs and the table (default: runs/compare-<preset>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@user_errors(KeyError, ValueError, CheckpointError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise UserError(f"--models: unknown {unknown or 'empty list'}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.n < 2:
        raise UserError("--steps must be >= 1 and --n >= 2")
    from training.data import DataError

    command = "kaem-compare " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        _, table = compare(args.preset, args.steps, Path(args.out or f"runs/compare-{args.preset}"), models, args.n,
                           args.posterior, args.data_root, args.features, args.device, not args.no_progress, command)
    except DataError as err:
        raise UserError(str(err)) from err
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
