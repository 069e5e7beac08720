"""``kaem-train``: the parser and a thin ``main`` over :mod:`training.train`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from training.cli import HelpFormatter, UserError, command, resolve_device
from training.config import (
    MODELS,
    PI0_KINDS,
    POSTERIOR_KINDS,
    PRESETS,
    PRIOR_KINDS,
    get_preset,
    with_model,
    with_overrides,
    with_settings,
)
from training.model.registry import MODEL_NAMES
from training.train import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-train",
        description="Train a KAEM (energy prior + decoder) by maximum likelihood with the chosen posterior "
        "estimator (--posterior), or one of the baselines (--model vae|lebm) with the same data, decoder and loop. "
        "Writes config.json, stats.jsonl, ckpt-XXXXXXX.pt and samples.png into the run directory. "
        "Multi-process: torchrun --nproc_per_node=N -m training.train ...",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default="fmnist", help=f"configuration preset: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=None, help="number of updates (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step per rank (default: preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="kaem (default), vae (Gaussian prior, amortised encoder, ELBO) or lebm (latent EBM of Pang "
                   "et al. 2020 with a 60-step Langevin prior sampler; its posterior uses the preset's Langevin "
                   "settings)")
    p.add_argument("--pi0", choices=PI0_KINDS, default=None,
                   help="KAEM's reference measure π₀ (docs/design.md §3; sets the quadrature domain); "
                   "default: the preset's")
    p.add_argument("--prior", choices=PRIOR_KINDS, default=None,
                   help="KAEM's latent layout (docs/prior_designs.md): univariate (the paper's KART, u_p shared "
                   "over q), mixture (Q independent coordinates, each a mixture of P energies), folded (KART "
                   "with a shifted tent fold of u_p per (q, p)), independent (KART sums of Q·P independent "
                   "draws; a deviation from the paper); default: the preset's")
    p.add_argument("--posterior", choices=POSTERIOR_KINDS, default=None,
                   help="posterior estimator: is (importance sampling), is_ula (IS chain starts + ULA moves in "
                   "the prior's noise space; the fmnist/mnist default), ula (Langevin), mala (MALA with "
                   "autoMALA step sizes), thermo (population annealing + thermodynamic integration); "
                   "default: the preset's. Langevin settings come from the preset")
    p.add_argument("--seed", type=int, default=None, help="seed for init, data order and noise (default: 0)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the project's data/ folder "
                   "that `make setup` fills; SVHN/CIFAR-10/CelebA need your own copy)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>, runs/<preset>-<model> for "
                   "baselines)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget: stop after this many minutes, checkpoint and write samples as usual "
                   "(schedules still assume --steps)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set posterior.n_samples=1000 --set posterior.step_size=1e-3 "
                   "(repeatable; applied after the other flags; --dry-run shows the result)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--samples", type=int, default=64, help="images in the final samples.png (0: none)")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 0:
        raise UserError("--steps must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError("--max-minutes must be > 0")
    cfg = with_overrides(get_preset(args.preset), steps=args.steps, seed=args.seed, lr=args.lr,
                         batch_size=args.batch_size)
    if args.posterior is not None:
        cfg = replace(cfg, posterior=replace(cfg.posterior, kind=args.posterior))
    if args.pi0 is not None:
        cfg = replace(cfg, prior=replace(cfg.prior, pi0=args.pi0))
    if args.prior is not None:
        cfg = replace(cfg, prior=replace(cfg.prior, kind=args.prior))
    cfg = with_settings(with_model(cfg, args.model), args.set)
    if cfg.model != "kaem" and args.posterior is not None:
        raise UserError(f"--posterior applies to KAEM only; the {MODEL_NAMES[cfg.model]} has its own objective")
    cfg.validate()
    if args.dry_run:
        print(cfg.to_json())
        return 0
    run_dir = Path(args.out or (f"runs/{cfg.preset}" if cfg.model == "kaem" else f"runs/{cfg.preset}-{cfg.model}"))
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    final = train(cfg, run_dir, device, args.data_root, args.resume, progress=not args.no_progress,
                  max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {run_dir} in {time.perf_counter() - t0:.0f} s -> {final}")
        if args.samples > 0:
            from training.sample import write_samples

            grid = write_samples(final, range(args.samples), run_dir / "samples.png")
            print(f"samples: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
