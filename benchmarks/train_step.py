"""Training-step benchmark, side by side in one run (ratios, not absolute numbers, are the result):

* ``reference``: the schema-1 default step as it was (univariate prior, IS with N_s = 100 proposals and
  per-(b, s) decoder noise, every B×N_s likelihood and every proposal's energy carrying gradients:
  ``losses.importance_sampling_loss_reference``);
* ``is``: the same configuration and estimator with the default IS loss (forward-only weights, gradients
  through the weighted pairs only: same draws, value and gradients, tests/test_is_loss.py) and the training
  loop's fused Adam (the reference keeps the per-parameter Adam it used);
* ``preset``: the preset's own step (for fmnist: mixture prior, is_ula posterior);
* ``is, no decoder noise``: the cheaper likelihood, for the record (it changes the estimator).

The ``reference`` runs on today's shared code (the KAN, decoder and noise helpers it calls got faster too).
``frozen`` is the step as it was when the speed target was set (revision ``--frozen-rev``, the issue's "today's
step"): that revision's training package, extracted with ``git archive`` and run in a worker process
(benchmarks/frozen_step.py), timed in the same rounds. Ratios are printed against both.

Then the share of the preset step's time spent in each profiled region.

    python benchmarks/train_step.py [--preset fmnist] [--steps 20] [--quick] [--threads N] [--frozen-rev REV]
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from training.config import KAEMConfig, get_preset
from training.losses import StepContext, importance_sampling_loss_reference
from training.model.registry import build_model, loss_fn_for
from training.runtime import keep_freed_memory
from training.uniforms import step_generator

REGIONS = ("kaem.prior_its", "kaem.prior_energy", "kaem.decoder", "kaem.likelihood", "kaem.langevin",
           "kaem.resample", "kaem.backward", "kaem.optimizer")
ROOT = Path(__file__).resolve().parents[1]
SCHEMA_1 = ROOT / "tests" / "fixtures" / "config_v1_fmnist.json"
# The commit whose README and step benchmark the 2x target of "Latent diversity, part 2" was measured on.
FROZEN_REV = "c71c72e"


def make_step(cfg: KAEMConfig, x: torch.Tensor, loss_fn=None, reference: bool = False):
    """One training step of ``cfg``: the training loop's optimiser, or with ``reference`` the per-parameter
    Adam the step used before (torch's CPU default)."""
    model = build_model(cfg, init_seed=0)
    loss_fn = loss_fn or loss_fn_for(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4) if reference else model.optimizer(1e-4)

    carry: dict[str, torch.Tensor] = {}  # sampler state from step to step, as the training loop hands it on

    def step(i: int) -> None:
        out = loss_fn(model, x, step_generator(0, i), cfg.posterior, StepContext(step=i, total_steps=1000, carry=carry))
        with record_function("kaem.backward"):
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        with record_function("kaem.optimizer"):
            opt.step()
        if out.carry:
            carry.clear()
            carry.update({k: v.detach() for k, v in out.carry.items()})

    return step


def frozen_step(rev: str, threads: int | None, workdir: Path) -> tuple[Callable[[int], None] | None, str]:
    """A step callable running revision ``rev``'s schema-1 IS step in a worker process, or (None, why not)."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "training"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        return None, f"git archive {rev} failed ({err.decode().strip() or e}): needs the repository's history"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(workdir, filter="data")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frozen_step.py"), str(workdir)]
    if threads:
        cmd += ["--threads", str(threads)]
    worker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = worker.stdout.readline().split()
    if ready[:1] != ["ready"] or not Path(ready[1]).resolve().is_relative_to(workdir.resolve()):
        worker.kill()
        return None, f"the worker did not load revision {rev}'s training package ({' '.join(ready) or 'no answer'})"

    def step(i: int) -> None:
        worker.stdin.write(f"{i}\n")
        worker.stdin.flush()
        float(worker.stdout.readline())

    return step, f"revision {rev}"


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
    p.add_argument("--frozen-rev", default=FROZEN_REV,
                   help="git revision whose step is the frozen reference (fmnist only; empty to skip)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 3 if args.quick else args.steps
    keep_freed_memory()  # as kaem-train does; the frozen worker runs with the allocator's defaults, as it did

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

    variants: dict[str, Callable[[int], None]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="kaem-frozen-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    if args.frozen_rev and args.preset == "fmnist":
        step, what = frozen_step(args.frozen_rev, args.threads, workdir)
        if step is None:
            print(f"frozen reference skipped: {what}")
        else:
            variants[f"frozen ({what}: the step when the 2x target was set)"] = step
    variants.update({
        "reference (schema-1 step: univariate, IS, all pairs with gradients)":
            make_step(old, x, importance_sampling_loss_reference, reference=True),
        "is (same configuration, weighted pairs only)": make_step(old, x),
        f"preset {preset.preset} ({preset.prior.kind} prior, {preset.posterior.kind})": make_step(preset, x),
        "is, no decoder noise (a different estimator)":
            make_step(replace(old, posterior=replace(old.posterior, decoder_noise=False)), x),
    })
    times = time_round_robin(variants, n)
    bases = [name for name in times if name.startswith(("frozen", "reference"))]
    print(f"\nmedian step time over {n} rounds (one step of each variant per round):")
    for name, t in times.items():
        ratios = "  ".join(f"{times[base] / t:5.2f}x {base.split()[0]}" for base in bases)
        print(f"  {name:70s} {1000 * t:7.1f} ms  {b / t:6.0f} img/s  {ratios}")

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
