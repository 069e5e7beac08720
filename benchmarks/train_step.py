"""Training-step benchmark: images/s of the real IS training step and the share of its time spent in
the prior (ITS + energies), decoder, likelihood, resampling, backward and optimiser, measured in one
run, plus side-by-side ratios of the options that change the cost (decoder noise on/off, and the
hand-written noisy-likelihood backward vs plain autograd).

    python benchmarks/train_step.py [--preset fmnist] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from training.config import get_preset
from training.losses import importance_sampling_loss
from training.model import KAEM
from training.uniforms import step_generator

REGIONS = ("kaem.prior_its", "kaem.prior_energy", "kaem.decoder", "kaem.likelihood", "kaem.resample",
           "kaem.backward", "kaem.optimizer")


def make_step(model: KAEM, x: torch.Tensor, posterior):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(i: int) -> None:
        out = importance_sampling_loss(model, x, step_generator(0, i), posterior)
        with record_function("kaem.backward"):
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        with record_function("kaem.optimizer"):
            opt.step()

    return step


def time_steps(step, n: int, warmup: int = 2) -> float:
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(n):
        step(warmup + i)
    return (time.perf_counter() - t0) / n


def autograd_likelihood(model: KAEM, x, logits, noise):
    """Plain-autograd reference of the noisy Gaussian log-likelihood (for the ratio only)."""
    xhat = torch.sigmoid(logits.flatten(1).unsqueeze(0) + model.sigma_n * noise)
    return -((x.flatten(1).unsqueeze(1) - xhat) ** 2).sum(-1) / (2 * model.sigma**2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--quick", action="store_true", help="3 steps per variant (smoke test)")
    args = p.parse_args()
    n = 3 if args.quick else args.steps

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    model = KAEM(cfg)
    x = torch.rand(cfg.train.batch_size, *cfg.decoder.image_shape)
    print(f"preset {cfg.preset}: batch {cfg.train.batch_size}, N_s {cfg.posterior.n_samples}, "
          f"P={cfg.prior.P} Q={cfg.prior.Q}, threads {torch.get_num_threads()}")

    # 1. Where the time goes (profiler regions inside the real loss), one profiled window.
    step = make_step(model, x, cfg.posterior)
    time_steps(step, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(100 + i)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in REGIONS}
    whole = sum(totals.values())
    print("\nshare of step time (profiled):")
    for name in REGIONS:
        print(f"  {name.removeprefix('kaem.'):13s} {100 * totals.get(name, 0) / whole:5.1f} %")
    prior_share = (totals.get("kaem.prior_its", 0) + totals.get("kaem.prior_energy", 0)) / whole
    print(f"  -> prior {100 * prior_share:.1f} %, decoder+likelihood "
          f"{100 * (totals.get('kaem.decoder', 0) + totals.get('kaem.likelihood', 0)) / whole:.1f} %, "
          f"resampling {100 * totals.get('kaem.resample', 0) / whole:.1f} %")

    # 2. Side by side, unprofiled: the default step, without decoder noise, and autograd likelihood.
    t_default = time_steps(make_step(model, x, cfg.posterior), n)
    t_nonoise = time_steps(make_step(model, x, replace(cfg.posterior, decoder_noise=False)), n)
    original = KAEM.log_likelihood
    KAEM.log_likelihood = lambda self, x, g, noise: (  # type: ignore[method-assign]
        original(self, x, g, None) if noise is None else autograd_likelihood(self, x, g, noise))
    try:
        t_autograd = time_steps(make_step(model, x, cfg.posterior), n)
    finally:
        KAEM.log_likelihood = original  # type: ignore[method-assign]
    b = cfg.train.batch_size
    print("\nstep time, side by side:")
    print(f"  default (decoder noise, hand-written backward) {1000 * t_default:7.1f} ms  {b / t_default:7.0f} img/s")
    print(f"  no decoder noise (matmul likelihood)           {1000 * t_nonoise:7.1f} ms  {b / t_nonoise:7.0f} img/s")
    print(f"  decoder noise, autograd likelihood             {1000 * t_autograd:7.1f} ms  {b / t_autograd:7.0f} img/s")
    print(f"  ratios: no-noise speed-up {t_default / t_nonoise:.2f}x; "
          f"hand-written vs autograd likelihood {t_autograd / t_default:.2f}x")


if __name__ == "__main__":
    main()
