"""Training-step benchmark, side by side in one run (ratios, not absolute numbers, are the result):

* ``reference``: the schema-1 default step as it was (univariate prior, IS with N_s = 100 proposals and
  per-(b, s) decoder noise, every B×N_s likelihood and every proposal's energy carrying gradients:
  ``losses.importance_sampling_loss_reference``);
* ``is``: the same configuration and estimator with the default IS loss (forward-only weights, gradients
  through the weighted pairs only: same draws, value and gradients, tests/test_is_loss.py);
* ``preset``: the preset's own step (for fmnist: mixture prior, is_ula posterior);
* ``is, no decoder noise``: the cheaper likelihood, for the record (it changes the estimator).

Then the share of the preset step's time spent in each profiled region.

    python benchmarks/train_step.py [--preset fmnist] [--steps 20] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from training.baselines import build_model, loss_fn_for
from training.config import KAEMConfig, get_preset
from training.losses import importance_sampling_loss_reference
from training.uniforms import step_generator

REGIONS = ("kaem.prior_its", "kaem.prior_energy", "kaem.decoder", "kaem.likelihood", "kaem.langevin",
           "kaem.resample", "kaem.backward", "kaem.optimizer")
SCHEMA_1 = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "config_v1_fmnist.json"


def make_step(cfg: KAEMConfig, x: torch.Tensor, loss_fn=None):
    model = build_model(cfg, init_seed=0)
    loss_fn = loss_fn or loss_fn_for(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(i: int) -> None:
        out = loss_fn(model, x, step_generator(0, i), cfg.posterior)
        with record_function("kaem.backward"):
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        with record_function("kaem.optimizer"):
            opt.step()

    return step


def time_round_robin(steps: dict[str, object], n: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each variant, timed one step of each in turn so that the machine's
    slow and fast spells (shared cores) fall on every variant alike."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(warmup + i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--quick", action="store_true", help="3 steps per variant (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 3 if args.quick else args.steps

    preset = get_preset(args.preset)
    # The reference is the schema-1 default configuration (the shipped fmnist config before the latent
    # redesign), with the preset's image size so that other presets compare like for like.
    old = KAEMConfig.from_dict(json.loads(SCHEMA_1.read_text()))
    if args.preset != "fmnist":
        old = replace(preset, prior=replace(preset.prior, kind="univariate"), posterior=replace(
            preset.posterior, kind="is"))
    x = torch.rand(preset.train.batch_size, *preset.decoder.image_shape, generator=torch.Generator().manual_seed(0))
    b = preset.train.batch_size
    print(f"preset {preset.preset}: batch {b}, N_s {preset.posterior.n_samples}, P={preset.prior.P} "
          f"Q={preset.prior.Q}, threads {torch.get_num_threads()}")

    variants = {
        "reference (schema-1 step: univariate, IS, all pairs with gradients)":
            make_step(old, x, importance_sampling_loss_reference),
        "is (same configuration, weighted pairs only)": make_step(old, x),
        f"preset {preset.preset} ({preset.prior.kind} prior, {preset.posterior.kind})": make_step(preset, x),
        "is, no decoder noise (a different estimator)":
            make_step(replace(old, posterior=replace(old.posterior, decoder_noise=False)), x),
    }
    times = time_round_robin(variants, n)
    ref = next(iter(times.values()))
    print(f"\nmedian step time over {n} rounds (one step of each variant per round):")
    for name, t in times.items():
        print(f"  {name:70s} {1000 * t:7.1f} ms  {b / t:6.0f} img/s  {ref / t:5.2f}x reference")

    step = make_step(preset, x)
    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(100 + i)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in REGIONS}
    whole = sum(totals.values())
    print(f"\nshare of the preset step's time (profiled, {preset.posterior.kind}):")
    for name in REGIONS:
        if name in totals:
            print(f"  {name.removeprefix('kaem.'):13s} {100 * totals[name] / whole:5.1f} %")


if __name__ == "__main__":
    main()
