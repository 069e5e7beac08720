"""``kaem-compare``: KAEM against its baselines (VAE, latent EBM) on one data set, trained by the same
harness with the same data, decoder and likelihood, then scored with the same classifier-space metrics
(with latent health and the blur ladder) and timed generating images. Writes ``comparison.md`` and
``comparison.json``.

Two budgets: ``--steps N`` (equal updates) or ``--minutes M`` (equal wall clock, the fair one on a
fixed machine: a model whose step is cheaper gets more of them). Under ``--minutes`` each model's step
is timed first and its schedule (a cosine learning rate is planned over steps) is sized to what fits in
M minutes; the run stops at M minutes either way. ``--lr-sweep`` first trains each baseline at ×0.3,
×1 and ×3 of its preset learning rate for M/4 minutes and keeps the factor with the lowest FD-clf;
``--lr-from comparison.json`` reuses the factors another comparison chose (e.g. Fashion-MNIST's for MNIST).

A model whose run folder already holds its finished run is loaded, not retrained; an interrupted one is
resumed (under ``--minutes``, for the rest of its budget). So re-running after a crash or with another
``--n`` costs only evaluation.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import latest_checkpoint, load_checkpoint, load_model
from training.config import KAEMConfig, get_preset, with_model, with_overrides
from training.errors import TrainingError
from training.model.registry import MODEL_NAMES
from training.runtime import keep_freed_memory

METRICS = (("fd_clf", "FD-clf", min), ("kid_clf", "KID-clf", min), ("precision_clf", "precision-clf", max),
           ("recall_clf", "recall-clf", max), ("gen_dim", "gen. dim", max), ("latent_pr", "h ratio", max),
           ("images_per_s", "sampling img/s", max))
LR_FACTORS = (0.3, 1.0, 3.0)
BASELINES = ("vae", "lebm")
BUDGET_FILE = "budget.json"  # a --minutes run's plan and whether it finished


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


def seconds_per_step(cfg: KAEMConfig, device: torch.device, data_root: str | None, n: int = 8) -> float:
    """Wall time per step of ``cfg``'s training loop, the rate a --minutes budget is planned with: the median of
    ``n`` steps after two warm-up ones (batches fetched as the loop fetches them, loss, backward, Adam), plus the
    loop's periodic work spread over the steps between two of its occurrences: latent health at every log line
    and a checkpoint every ``checkpoint_every`` steps. Without them a small model's plan ate the whole margin: a
    2-minute Fashion-MNIST VAE planned at 19.1 ms a step ran at 20.8 (its latent health alone adds ~1.4 ms a step),
    and the README's 10-minute one made 24,930 of 28,289 planned updates; with them, 21.9 planned and 21.5 ran."""
    import tempfile

    from training.checkpoint import save_checkpoint
    from training.data.datasets import fetch, load_dataset
    from training.eval.health import latent_health
    from training.losses import StepContext
    from training.model.registry import build_model, loss_fn_for
    from training.train import StepBatches
    from training.uniforms import step_generator

    keep_freed_memory()  # as train() does: the rate planned with is the loop's
    tc = cfg.train
    data = load_dataset(tc.dataset, data_root, "train")
    batches = StepBatches(len(data), tc.batch_size, 1, 0, tc.seed)
    model = build_model(cfg).to(device)
    loss_fn = loss_fn_for(cfg)
    opt = model.optimizer(tc.lr)
    times = []
    for i in range(n + 2):
        t0 = time.perf_counter()
        x = fetch(data, batches(i), device)
        out = loss_fn(model, x, step_generator(tc.seed, i, 0, device), cfg.posterior,
                      StepContext(step=i, total_steps=tc.steps))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    if hasattr(model, "latent_of_u"):
        latent_health(model)
    health_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp) / "ckpt.pt", model, n, opt, {})
        checkpoint_s = time.perf_counter() - t0
    return (statistics.median(times[2:]) + health_s / max(1, tc.log_every)
            + checkpoint_s / max(1, tc.checkpoint_every))


def with_lr_factor(cfg: KAEMConfig, factor: float) -> KAEMConfig:
    """Every learning rate of the model ×factor (the latent EBM's energy has its own)."""
    if factor == 1.0:
        return cfg
    cfg = with_overrides(cfg, lr=cfg.train.lr * factor)
    if cfg.model == "lebm":
        cfg = replace(cfg, baseline=replace(cfg.baseline, energy_lr=cfg.baseline.energy_lr * factor))
    return cfg


def train_for_minutes(cfg: KAEMConfig, run_dir: Path, minutes: float, data_root: str | None, device: torch.device,
                      progress: bool) -> Path:
    """Train ``cfg`` for ``minutes`` of wall clock into ``run_dir`` with its schedule planned over the steps that
    fit (measured by :func:`seconds_per_step`, 10 % kept for what it does not time: grid refits, start-up); a
    finished run is reused, an interrupted one resumed for the rest of its budget."""
    from training.train import train

    plan_path = run_dir / BUDGET_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    latest = latest_checkpoint(run_dir)
    same = plan is not None and plan["minutes"] == minutes and plan["lr"] == cfg.train.lr
    if latest is not None and not same:
        raise TrainingError(f"{run_dir} holds another run (not a {minutes:g}-minute run at lr {cfg.train.lr:g}): "
                        "remove it or choose another --out")
    if same and plan["finished"] and latest is not None:
        print(f"{run_dir}: reusing {latest.name} ({minutes:g}-minute run)", file=sys.stderr)
        return latest
    spent = 0.0
    if same and latest is not None:
        spent = float(load_checkpoint(latest)["train_state"].get("train_seconds", 0.0))
    else:
        t = seconds_per_step(cfg, device, data_root)
        plan = {"minutes": minutes, "lr": cfg.train.lr, "seconds_per_step": t,
                "steps": max(10, int(0.9 * 60.0 * minutes / t)), "finished": False}
        run_dir.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
        print(f"{run_dir}: {t * 1000:.0f} ms per step -> {plan['steps']} steps planned for {minutes:g} min",
              file=sys.stderr)
    path = train(with_overrides(cfg, steps=plan["steps"]), run_dir, device, data_root, resume=latest is not None,
                 progress=progress, max_seconds=max(1.0, 60.0 * minutes - spent))
    plan["finished"] = True
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


def sampling_speed(model, n: int = 1024, batch: int = 256) -> float:
    """Images/s of eager generation (seeds → images, uint8) after one warm-up batch."""
    from training.sample import sample_images

    sample_images(model, range(batch), batch=batch)
    t0 = time.perf_counter()
    sample_images(model, range(n), batch=batch)
    return n / (time.perf_counter() - t0)


def _cell(r: dict[str, Any], key: str) -> str:
    v = r.get(key)
    if v is None:
        return "n/a"
    return {"fd_clf": f"{v:.1f}", "kid_clf": f"{v:.1f}", "images_per_s": f"{v:.0f}", "gen_dim": f"{v:.2f}",
            "latent_pr": f"{v:.1f}"}.get(key, f"{v:.3f}")


def _updates(r: dict[str, Any]) -> str:
    """Updates made; under --minutes "n of planned" when the budget ended the run before its schedule did."""
    planned = r.get("planned_steps")
    return f"{r['updates']} of {planned}" if planned and r["updates"] < planned else str(r["updates"])


def winners(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The model that wins each metric (ties share it); metrics a model lacks (n/a) do not count."""
    out = {}
    for key, label, best in METRICS:
        have = [r for r in rows if r.get(key) is not None]
        if have:
            top = best(r[key] for r in have)
            out[label] = " = ".join(r["name"] for r in have if r[key] == top)
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    budget = (f"{meta['minutes']:g} minutes of training per model (equal wall clock; each schedule planned over "
              "the steps that fit)" if meta.get("minutes") else f"{meta['steps']} updates per model")
    lines = [
        f"Data set **{meta['dataset']}** (preset `{meta['preset']}`), {budget}, batch {meta['batch_size']}; "
        f"{meta['n']} generated vs {meta['n']} test images, classifier `{meta['features']}` (test accuracy "
        f"{meta['classifier_accuracy']:.1%}). FD-clf/KID-clf are Fréchet distance and KID in that "
        "classifier's feature space, not FID. gen. dim / h ratio: latent health (training/eval/health.py; n/a for "
        f"the latent EBM, whose prior is a Langevin chain, not a map of u). Device: {meta['device']}, "
        f"{meta['threads']} torch threads.",
        "",
        "| model | updates | lr | train time | FD-clf ↓ | (blur px) | KID-clf ↓ | precision-clf ↑ | recall-clf ↑ | "
        "gen. dim ↑ | h ratio ↑ | sampling img/s ↑ |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        blur = r.get("fd_clf_blur_px")
        lines.append(
            f"| {r['name']} | {_updates(r)} | {r['lr']:g} | {r['train_seconds'] / 60:.1f} min | "
            f"{_cell(r, 'fd_clf')} | "
            f"{'n/a' if blur is None else f'{blur:.2f}'} | {_cell(r, 'kid_clf')} | {_cell(r, 'precision_clf')} | "
            f"{_cell(r, 'recall_clf')} | {_cell(r, 'gen_dim')} | {_cell(r, 'latent_pr')} | {_cell(r, 'images_per_s')} |"
        )
    lines += ["", "Best per metric: " + "; ".join(f"{k}: {v}" for k, v in winners(rows).items()) + "."]
    if meta.get("blur_ladder"):
        lines += ["", "Blur ladder (real training images blurred by σ px vs the same test images):", "",
                  "| σ px | FD-clf | KID-clf | precision-clf | recall-clf |", "|---|---|---|---|---|"]
        lines += [f"| {g['sigma']:.1f} | {g['fd_clf']:.1f} | {g['kid_clf']:.1f} | {g['precision_clf']:.3f} | "
                  f"{g['recall_clf']:.3f} |" for g in meta["blur_ladder"]]
    if meta.get("sweeps"):
        lines += ["", f"Learning-rate sweeps ({meta['minutes'] / 4:g} minutes each, n = {meta['sweep_n']}; the "
                  "lowest FD-clf is kept):", "", "| model | ×lr | lr | updates | FD-clf | recall-clf |",
                  "|---|---|---|---|---|---|"]
        for name, runs in meta["sweeps"].items():
            lines += [f"| {MODEL_NAMES[name]} | {s['factor']:g} | {s['lr']:g} | {s['updates']} | {s['fd_clf']:.1f} | "
                      f"{s['recall_clf']:.3f} |" for s in runs]
    if meta.get("lr_from"):
        lines += ["", f"Learning-rate factors reused from `{meta['lr_from']}`: "
                  + ", ".join(f"{MODEL_NAMES[k]} ×{v:g}" for k, v in meta["lr_factors"].items()) + "."]
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def _score(model, cfg: KAEMConfig, n: int, data_root: str | None, features: str | None, dev: torch.device,
           progress: bool, ladder: bool) -> dict[str, Any]:
    from training.eval.evaluate import evaluate

    return evaluate(model, cfg.train.dataset, n, data_root=data_root, features=features, device=dev, ladder=ladder,
                    progress=progress)


def sweep_lr(cfg: KAEMConfig, out: Path, minutes: float, n: int, data_root: str | None, features: str | None,
             dev: torch.device, progress: bool) -> tuple[float, list[dict[str, Any]]]:
    """Train ``cfg`` at each of :data:`LR_FACTORS` × its learning rate for ``minutes``; the factor with the
    lowest FD-clf (n images) and every run's scores."""
    runs = []
    for factor in LR_FACTORS:
        c = with_lr_factor(cfg, factor)
        path = train_for_minutes(c, out / f"{cfg.model}-lr{factor:g}", minutes, data_root, dev, progress)
        model, ckpt = load_model(path, map_location=dev)
        rep = _score(model, c, n, data_root, features, dev, progress, ladder=False)
        runs.append({"factor": factor, "lr": c.train.lr, "updates": int(ckpt["step"]), "fd_clf": rep["fd_clf"],
                     "recall_clf": rep["recall_clf"]})
    return min(runs, key=lambda s: s["fd_clf"])["factor"], runs


def compare(preset: str, steps: int | None, out: Path, models: list[str], n: int, posterior: str | None = None,
            data_root: str | None = None, features: str | None = None, device: str | torch.device = "cpu",
            progress: bool = True, command: str = "", minutes: float | None = None, lr_sweep: bool = False,
            lr_from: str | None = None, sweep_n: int = 2000) -> tuple[list[dict[str, Any]], str]:
    from training.eval.evaluate import blur_equivalent

    dev = torch.device(device)
    base = get_preset(preset) if minutes else with_overrides(get_preset(preset), steps=steps)
    if posterior is not None:
        base = replace(base, posterior=replace(base.posterior, kind=posterior))
    factors: dict[str, float] = {}
    meta: dict[str, Any] = {"minutes": minutes, "steps": steps}
    if lr_from:
        chosen = json.loads(Path(lr_from).read_text())["meta"].get("lr_factors", {})
        factors = {k: float(v) for k, v in chosen.items() if k in models}
        meta.update(lr_from=lr_from, lr_factors=factors)
    elif lr_sweep:
        meta["sweeps"], meta["sweep_n"] = {}, min(n, sweep_n)
        for name in (m for m in models if m in BASELINES):
            factors[name], meta["sweeps"][name] = sweep_lr(with_model(base, name), out / "sweep", minutes / 4,
                                                           meta["sweep_n"], data_root, features, dev, progress)
        meta["lr_factors"] = factors
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(models):
        cfg = with_lr_factor(with_model(base, name), factors.get(name, 1.0))
        if minutes:
            ckpt_path = train_for_minutes(cfg, out / f"{name}-{minutes:g}min", minutes, data_root, dev, progress)
        else:
            ckpt_path = train_or_load(cfg, out / name, data_root, dev, progress)
        model, ckpt = load_model(ckpt_path, map_location=dev)
        report = _score(model, cfg, n, data_root, features, dev, progress, ladder=i == 0)  # the ladder is data-only
        health = report.get("latent_health", {})
        plan_path = ckpt_path.parent / BUDGET_FILE
        planned = json.loads(plan_path.read_text())["steps"] if minutes and plan_path.is_file() else None
        label = MODEL_NAMES[name] + (f" ({cfg.posterior.kind.upper()})" if name == "kaem" else "")
        rows.append({
            "model": name, "name": label, "checkpoint": str(ckpt_path), "updates": int(ckpt["step"]),
            "planned_steps": planned,
            "lr": cfg.train.lr, "train_seconds": float(ckpt["train_state"].get("train_seconds", float("nan"))),
            "images_per_s": sampling_speed(model), "gen_dim": health.get("gen_dim"),
            "latent_pr": health.get("latent_pr"),
            **{k: report[k] for k in ("fd_clf", "kid_clf", "kid_clf_std", "precision_clf", "recall_clf")},
        })
        if "blur_ladder" in report:
            meta["blur_ladder"] = report["blur_ladder"]
        meta.update({"dataset": cfg.train.dataset, "preset": preset, "batch_size": cfg.train.batch_size,
                     "n": report["n"], "features": report["classifier"]["path"],
                     "classifier_accuracy": report["classifier"]["test_accuracy"], "device": str(dev),
                     "threads": torch.get_num_threads(), "command": command})
    for r in rows:  # the blur-equivalent σ of every model's FD-clf, on the one ladder
        r["fd_clf_blur_px"] = blur_equivalent(r["fd_clf"], meta["blur_ladder"]) if meta.get("blur_ladder") else None
    table = markdown(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows, table
