"""Posterior-estimator benchmark: the cost of one full training step (loss + backward + Adam step)
with each estimator of design.md §5.3-5.5 (IS, IS + ULA moves, ULA, MALA, Thermo at N_t = 2, 5, 10) on the same model
and the same batch of real images, measured side by side in one run, with the estimators' health
statistics and the Thermo cost per temperature (docs/design.md §7.3: "≈ linear" in N_t).

    python benchmarks/posterior.py [--preset fmnist] [--checkpoint PATH] [--steps 5] [--quick]
                                   [--batch-size B] [--threads N] [--json PATH]

Every variant starts from the same parameters (restored before each) with a fresh Adam, runs one
warm-up step and then --steps timed steps; MALA's step sizes carry across steps as in training.
"grads" counts the batch-wide ∇ log γ evaluations per step (samplers.value_and_grad calls): MALA's
search runs the whole batch until its slowest chain stops, so it exceeds the per-chain search_evals.
On a shared machine prefer --threads 1: oversubscribed OpenMP threads slow steps by up to ~10x
(the load average before and after the run is printed for that reason).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.config import PosteriorConfig, get_preset
from training.losses import POSTERIORS, StepContext
from training.mcmc import samplers
from training.model.kaem import KAEM
from training.uniforms import step_generator

THERMO_TEMPS = (2, 5, 10)
# Health statistics per estimator (keys of LossOutput.stats), averaged over the timed steps.
HEALTH = {
    "is": ("ess", "resampled"),
    "is_ula": ("ess", "move"),
    "ula": ("loglik",),
    "mala": ("accept", "eta", "reversible", "search_evals"),
    "thermo": ("swap_rate", "log_px"),
}
LINEAR_TOL = 0.05  # relative RMS residual of the N_t fit below which growth counts as ~linear
QUICK_BATCH, QUICK_LANGEVIN = 8, 3
_GRAD_CALLS = [0]


def _count_grads() -> None:
    """Count samplers.value_and_grad calls (every Langevin/leapfrog gradient goes through it)."""
    original = samplers.value_and_grad

    def counted(log_target, z):
        _GRAD_CALLS[0] += 1
        return original(log_target, z)

    samplers.value_and_grad = counted


def variants(base: PosteriorConfig) -> list[tuple[str, PosteriorConfig]]:
    out = [(kind, replace(base, kind=kind)) for kind in ("is", "is_ula", "ula", "mala")]
    out += [(f"thermo(N_t={k})", replace(base, kind="thermo", n_temps=k)) for k in THERMO_TEMPS]
    return out


def run_variant(model: KAEM, state: dict[str, torch.Tensor], x: torch.Tensor, post: PosteriorConfig,
                seed: int, total_steps: int, lr: float, n_timed: int, label: str) -> dict:
    """Restore the parameters, then 1 warm-up + n_timed training steps; per-step times and stats."""
    model.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = POSTERIORS[post.kind]
    carry: dict[str, torch.Tensor] = {}
    times: list[float] = []
    stats: list[dict[str, float]] = []
    grads: list[int] = []
    for i in range(1 + n_timed):
        _GRAD_CALLS[0] = 0
        t0 = time.perf_counter()
        ctx = StepContext(step=i, total_steps=total_steps, carry=carry)
        out = loss_fn(model, x, step_generator(seed, i), post, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if out.carry:  # the training loop's carry-over (MALA's per-chain η_init)
            carry = {k: v.detach() for k, v in out.carry.items()}
        phase = "warm-up" if i == 0 else f"step {i}/{n_timed}"
        print(f"  {label:15s} {phase:10s} {dt:8.2f} s  loss {float(out.loss.detach()):.4g}  grads {_GRAD_CALLS[0]}",
              file=sys.stderr, flush=True)
        if i > 0:
            times.append(dt)
            stats.append(out.stats)
            grads.append(_GRAD_CALLS[0])
    health = {k: statistics.fmean(s[k] for s in stats) for k in HEALTH[post.kind] if all(k in s for s in stats)}
    return {"times_s": times, "ms_per_step": 1000 * statistics.fmean(times), "health": health,
            "loss": statistics.fmean(s["loss"] for s in stats), "grads_per_step": statistics.fmean(grads)}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = intercept + slope·x; returns (slope, intercept, RMS residual / mean y)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    rms = math.sqrt(statistics.fmean((b - intercept - slope * a) ** 2 for a, b in zip(xs, ys, strict=True)))
    return slope, intercept, rms / my


def fmt_health(h: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in h.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist")
    p.add_argument("--checkpoint", default=None, help="load the model (and its config) from this checkpoint")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $KAEM_DATA_ROOT or data/)")
    p.add_argument("--batch-size", type=int, default=None, help="first B training images (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 1 timed step, batch <= {QUICK_BATCH}, <= {QUICK_LANGEVIN} Langevin steps")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _count_grads()
    load_before = os.getloadavg()[0]

    from training.data.datasets import default_data_root, load_dataset

    torch.manual_seed(0)
    if args.checkpoint:
        from training.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
        model.train()
        cfg = model.cfg
        source = f"checkpoint {args.checkpoint}"
    else:
        cfg = get_preset(args.preset)
        model = KAEM(cfg)
        source = f"preset {cfg.preset} (fresh init)"
    n_timed = 1 if args.quick else args.steps
    batch = args.batch_size or cfg.train.batch_size
    post = cfg.posterior
    if args.quick:
        batch = min(batch, QUICK_BATCH)
        post = replace(post, langevin_steps=min(post.langevin_steps, QUICK_LANGEVIN))

    data_root = args.data_root or default_data_root()
    ds = load_dataset(cfg.train.dataset, data_root, "train")
    if len(ds) < batch:
        p.error(f"{cfg.train.dataset} has {len(ds)} images, fewer than --batch-size {batch}")
    x = torch.stack([ds[i] for i in range(batch)])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    print(f"{source}: dataset {cfg.train.dataset} (first {batch} train images), batch {batch}, "
          f"torch threads {torch.get_num_threads()}, "
          f"load average {load_before:.2f} on {os.cpu_count()} CPUs")
    print(f"Langevin steps {post.langevin_steps}, eta {post.step_size:g}, IS N_s {post.n_samples}, "
          f"MALA eta in [{post.eta_min:g}, {post.eta_max:g}], Thermo p {post.power_start:g}->{post.power_end:g}, "
          f"timed steps {n_timed} (+1 warm-up)", flush=True)

    results: dict[str, dict] = {}
    for label, pc in variants(post):
        replace(cfg, posterior=pc).validate()
        results[label] = run_variant(model, state, x, pc, cfg.train.seed, cfg.train.steps, cfg.train.lr,
                                     n_timed, label)
        results[label].update(kind=pc.kind, n_temps=pc.n_temps if pc.kind == "thermo" else None)

    t_is = results["is"]["ms_per_step"]
    load_after = os.getloadavg()[0]
    print(f"\n{'estimator':15s} {'ms/step':>10s} {'images/s':>9s} {'x IS':>8s} {'grads':>6s}  "
          "health (mean over timed steps)")
    for label, r in results.items():
        r["images_per_s"] = batch / (r["ms_per_step"] / 1000)
        r["ratio_to_is"] = r["ms_per_step"] / t_is
        print(f"{label:15s} {r['ms_per_step']:10.1f} {r['images_per_s']:9.1f} {r['ratio_to_is']:8.2f} "
              f"{r['grads_per_step']:6.0f}  {fmt_health(r['health'])}")

    temps = [float(k) for k in THERMO_TEMPS]
    t_thermo = [results[f"thermo(N_t={k})"]["ms_per_step"] for k in THERMO_TEMPS]
    slope, intercept, rel = linear_fit(temps, t_thermo)
    linear = rel < LINEAR_TOL
    t_ula = results["ula"]["ms_per_step"]
    print(f"\nThermo cost per temperature: {slope:.1f} ms per N_t (least squares over N_t = "
          f"{', '.join(map(str, THERMO_TEMPS))}: slope {slope:.1f} ms, intercept {intercept:.1f} ms, "
          f"relative RMS residual {100 * rel:.1f} %) -> growth {'~linear' if linear else 'NOT linear'} "
          f"(tolerance {100 * LINEAR_TOL:.0f} %); slope / ULA step {slope / t_ula:.2f}")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after the run ({os.cpu_count()} CPUs)")

    if args.json:
        payload = {
            "source": source, "preset": cfg.preset, "dataset": cfg.train.dataset, "batch_size": batch,
            "threads": torch.get_num_threads(),
            "load_average": [load_before, load_after], "cpus": os.cpu_count(),
            "langevin_steps": post.langevin_steps, "eta": post.step_size,
            "n_samples": post.n_samples, "timed_steps": n_timed, "quick": args.quick, "estimators": results,
            "thermo_fit": {"n_temps": list(THERMO_TEMPS), "ms": t_thermo, "slope_ms_per_temp": slope,
                           "intercept_ms": intercept, "relative_rms_residual": rel, "linear": linear,
                           "slope_over_ula_step": slope / t_ula},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
