"""The training loop and ``kaem-train``: one linear, block-commented function, device- and
rank-aware, so ``torchrun --nproc_per_node=N -m training.train ...`` runs DDP on the same code.

Every step is a pure function of (parameters, optimiser state, seed, step, rank): data order
comes from (seed, epoch), noise from (seed, step, rank), so ``--resume`` reproduces an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from training.checkpoint import (
    checkpoint_name,
    config_of,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.config import (
    KAEMConfig,
    TrainConfig,
)
from training.data.datasets import fetch
from training.errors import ConfigError, TrainingError
from training.eval.health import LatentHealth, latent_health
from training.io import LineLog, atomic_write_text
from training.losses import CHAINS_IN_Z, StepContext
from training.model.kaem import KAEM, LatentImageModel
from training.model.registry import build_model, loss_fn_for
from training.runtime import keep_freed_memory
from training.uniforms import step_generator

GRID_STREAM = 0x6772_6964  # rank slot for grid-refit noise: identical on every rank keeps DDP in sync
KEEP_CHECKPOINTS = 3
# Sampler and latent health on the progress line, when present.
PROGRESS_KEYS = ("ess", "accept", "eta", "swap_rate", "latent_pr", "gen_dim")


class LossModule(nn.Module):
    """Wraps model + estimator so DistributedDataParallel sees the loss computation as forward()."""

    def __init__(self, model: LatentImageModel):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn_for(model.cfg)

    def forward(self, x: Tensor, gen: torch.Generator, ctx: StepContext
                ) -> tuple[Tensor, dict[str, float], Tensor | None, dict[str, Tensor], Tensor | None]:
        cfg = self.model.cfg.posterior
        out = self.loss_fn(self.model, x, gen, cfg, ctx)
        return out.loss, out.stats, out.z, out.carry, out.chains


class StepBatches:
    """Batch indices for step i: DistributedSampler order of epoch i // batches_per_epoch."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch < 1:
            raise TrainingError(f"dataset of {n} images is smaller than one batch of {batch_size} per rank")
        self._epoch, self._order = -1, []

    def __call__(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(iter(self.sampler))
        return self._order[offset * self.batch_size : (offset + 1) * self.batch_size]


@torch.no_grad()
def refit_grids(model: LatentImageModel, seed: int, step: int, n: int, device: torch.device) -> None:
    """Spec §2.3: refit RBF grids (prior and KAN decoder) to prior samples (the IS rule; the VAE's
    decoder to N(0, I) draws)."""
    gen = step_generator(seed, step, GRID_STREAM, device)
    if not isinstance(model, KAEM):
        model.decoder.refit_grid(torch.randn(n, model.cfg.prior.Q, generator=gen, device=device))
        return
    z = model.prior.sample(torch.rand(n, model.u_dim, generator=gen, device=device))
    model.prior.refit_grid(z)
    model.decoder.refit_grid(model.prior.latent(z))


@torch.no_grad()
def refit_from_posterior(model: LatentImageModel, z: Tensor, domain_update: bool) -> tuple[float, float] | None:
    """The Langevin rule of docs/design.md §2.3: refit RBF grids to posterior samples z (all ranks' chains)
    and, with ``domain_update``, reset the quadrature domain to their range widened by 10% on
    each side: [min − 0.1|min|, max + 0.1|max|] (the reference's (0.9 min, 1.1 max) shrinks a
    negative bound, §9 bug 2); nodes, weights and knots are rebuilt. Returns the new domain."""
    domain = None
    if not isinstance(model, KAEM):  # the latent EBM: its energy is FFT (no grid); refit the decoder
        model.decoder.refit_grid(z)
        return None
    if domain_update:
        lo, hi = float(z.min()), float(z.max())
        domain = (lo - 0.1 * abs(lo), hi + 0.1 * abs(hi))
        if not (math.isfinite(lo) and math.isfinite(hi) and domain[0] < domain[1]):
            raise TrainingError(f"posterior samples span [{lo}, {hi}]: cannot set a quadrature domain")
        model.prior.set_domain(*domain)
    model.prior.refit_grid(z)
    model.decoder.refit_grid(model.prior.latent(z))
    return domain


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Multiplier of every group's base learning rate at ``step`` (a pure function: resume needs no state)."""
    if tc.lr_schedule == "constant" or tc.steps <= 0:
        return 1.0
    r = tc.lr_final_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * min(step, tc.steps) / tc.steps))


def _warn_health(health: LatentHealth, step: int, warned: bool) -> bool:
    """Print the latent-health warnings when the model becomes flagged (not at every log line); returns
    whether it is flagged now."""
    problems = health.warnings()
    if problems and not warned:
        for w in problems:
            tqdm.write(f"warning (step {step}): {w}", file=sys.stderr)
    return bool(problems)


def gather_ranks(t: Tensor, world: int) -> Tensor:
    """Stack a same-shaped tensor from every rank: [world, ...] (just t[None] without DDP)."""
    if world <= 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def check_ranks_in_sync(model: nn.Module) -> None:
    """DDP keeps replicas identical; verify it (grid refits and buffers included) before saving."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat - ref).abs().max())], device=flat.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if float(diff) != 0.0:
        raise RuntimeError(f"DDP ranks diverged: max parameter difference {float(diff):.3g}")
    if dist.get_rank() == 0:
        print(f"ranks in sync: {dist.get_world_size()} replicas identical", file=sys.stderr)


def out_of_time(expired: bool, world: int, device: torch.device) -> bool:
    """Rank 0's clock decides, so every rank leaves the loop after the same step."""
    if world <= 1:
        return expired
    flag = torch.tensor([float(expired)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(cfg: KAEMConfig, run_dir: Path, device: torch.device, data_root: str | None = None,
          resume: bool = False, progress: bool = True, max_seconds: float | None = None) -> Path:
    # Returns the last checkpoint written (on rank 0; other ranks return its expected path).
    """Train ``cfg`` into ``run_dir``; returns the final checkpoint path. ``max_seconds`` stops the
    loop early (all ranks at the same step) and checkpoints there; schedules keep the planned total."""
    from training.data.datasets import load_dataset  # deferred: the CLI's --dry-run and errors stay fast

    # ---- Distributed setup and run directory --------------------------------------------------
    rank, world, device = init_distributed(device)
    is_main = rank == 0
    keep_freed_memory()  # the step's large tensors reuse the process's memory instead of faulting it in again
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise TrainingError(f"{run_dir} already holds checkpoints ({latest.name}): pass --resume to continue it "
                        "or choose another --out")

    # ---- Model, optimiser, and (on --resume) every piece of state that carries across steps ----
    # (Sampler state is per rank: ``carry`` holds every rank's copy [world, ...] so rank 0 can save it.)
    train_state: dict[str, Any] = {"next_grid_update": 0, "grid_interval": float(cfg.train.grid_update_every),
                                   "carry": {}, "train_seconds": 0.0}
    ckpt = None
    if resume and latest is not None:
        ckpt = load_checkpoint(latest, map_location=device)
        steps = cfg.train.steps
        cfg = config_of(ckpt)
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))
        train_state.update(ckpt["train_state"])
    model = build_model(cfg).to(device)
    tc = cfg.train
    # Grids follow posterior chains (after the step) under Langevin-family training, prior draws before it otherwise.
    langevin = cfg.model == "lebm" or (cfg.model == "kaem" and cfg.posterior.kind != "is")
    # Whether the refits also move the quadrature domain to the chains (chains that move z itself).
    domain_follows = tc.domain_update and (cfg.model != "kaem" or cfg.posterior.kind in CHAINS_IN_Z)
    carry = {k: v[rank].to(device) for k, v in train_state["carry"].items() if v.shape[0] == world}
    if len(carry) < len(train_state["carry"]) and is_main:
        print("resume: sampler state was saved with another number of ranks; it starts afresh", file=sys.stderr)
    if tc.optimizer != "adam":
        raise ConfigError(f"optimizer {tc.optimizer!r} is not available; use adam")
    opt = model.optimizer(tc.lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
    loss_module: nn.Module = LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module)

    # ---- Data: in-memory datasets, deterministic per-(seed, epoch) order, sharded over ranks ----
    dataset = load_dataset(tc.dataset, data_root, "train")
    batches = StepBatches(len(dataset), tc.batch_size, world, rank, tc.seed)
    # Persistent posterior chains, one row per training image (NaN: not visited yet). Every rank holds all of
    # them (an image meets other ranks in later epochs), so each step's rows are gathered from all ranks.
    persistent = cfg.model == "kaem" and cfg.posterior.kind == "is_ula" and cfg.posterior.persistent
    if not persistent:
        train_state.pop("chains", None)
    else:
        chains = train_state.get("chains")
        chains = None if chains is None else chains.cpu()
        if chains is None or tuple(chains.shape) != (len(dataset), model.u_dim):
            if chains is not None and is_main:
                print("resume: the stored persistent chains do not fit this dataset; they start afresh",
                      file=sys.stderr)
            chains = torch.full((len(dataset), model.u_dim), float("nan"))
        train_state["chains"] = chains
    if is_main:
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        log = LineLog(run_dir / "stats.jsonl")
        if start:
            log.write_line(json.dumps({"event": "resume", "step": start}))

    def checkpoint(step: int) -> Path:
        # Wall time spent in the loop over all sessions of this run (kaem-compare reports it).
        train_state["train_seconds"] = seconds_before + time.perf_counter() - t_start
        path = save_checkpoint(run_dir / checkpoint_name(step), model, step, opt, train_state)
        for old in sorted(run_dir.glob("ckpt-*.pt"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    # ---- The loop -------------------------------------------------------------------------------
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    acc: dict[str, float] = {}
    acc_n: dict[str, int] = {}
    n_acc, t_window, completed = 0, time.perf_counter(), start
    warned = False
    t_start = time.perf_counter()
    seconds_before = float(train_state.get("train_seconds", 0.0))
    final = latest
    try:
        for step in range(start, tc.steps):
            # Grid refits on a schedule whose interval grows by grid_update_growth per refit: before
            # the step from prior samples under IS, after it from the posterior chains otherwise.
            refit = (bool(tc.grid_update_every) and step == train_state["next_grid_update"]
                     and step <= tc.grid_update_until)
            if refit:
                if not langevin:
                    refit_grids(model, tc.seed, step, tc.grid_samples, device)
                train_state["grid_interval"] *= tc.grid_update_growth
                train_state["next_grid_update"] = step + max(1, round(train_state["grid_interval"]))

            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * lr_factor(tc, step)
            idx = batches(step)
            x = fetch(dataset, idx, device)
            rows = train_state["chains"][idx].to(device) if persistent else None
            ctx = StepContext(step=step, total_steps=tc.steps, carry=carry, chains=rows)
            loss, stats, z_post, new_carry, new_rows = loss_module(x, step_generator(tc.seed, step, rank, device), ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                stats["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            opt.step()
            completed = step + 1
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {float(loss)} at step {step}: lower --lr or check the data")
            if new_carry:
                train_state["carry"] = {k: gather_ranks(v, world).cpu() for k, v in new_carry.items()}
                carry = {k: v.detach() for k, v in new_carry.items()}
            if rows is not None and new_rows is not None:
                where = gather_ranks(torch.tensor(idx, device=device), world).flatten().cpu()
                train_state["chains"][where] = gather_ranks(new_rows.detach(), world).flatten(0, 1).float().cpu()
            if refit and langevin and z_post is not None:
                refit_from_posterior(model, gather_ranks(z_post.detach(), world).flatten(0, 1), domain_follows)

            # Logging (rank 0): averages over the window, images/s over all ranks.
            for k, v in stats.items():  # a stat may skip a step (persistent chains: no IS rows, no ESS)
                acc[k] = acc.get(k, 0.0) + v
                acc_n[k] = acc_n.get(k, 0) + 1
            n_acc += 1
            done = step + 1
            stop = max_seconds is not None and out_of_time(time.perf_counter() - t_start > max_seconds, world, device)
            if is_main and (step == start or done % tc.log_every == 0 or done == tc.steps or stop):
                dt = time.perf_counter() - t_window
                rec = {"step": done, **{k: v / acc_n[k] for k, v in acc.items()},
                       **({"lr_factor": lr_factor(tc, step)} if tc.lr_schedule != "constant" else {}),
                       "images_per_s": n_acc * tc.batch_size * world / max(dt, 1e-9), "time": time.time()}
                if langevin and domain_follows and cfg.model == "kaem":
                    rec["domain"] = [round(v, 5) for v in model.prior.domain.tolist()]
                health = latent_health(model) if hasattr(model, "latent_of_u") else None
                if health is not None:
                    rec.update(latent_pr=health.latent_pr, gen_dim=health.gen_dim, latent_top3=list(health.latent_top3))
                    warned = _warn_health(health, done, warned)
                log.write_line(json.dumps(rec))
                bar.set_postfix(loss=f"{rec['loss']:.1f}", loglik=f"{rec['loglik']:.1f}",
                                **{k: f"{rec[k]:.3g}" for k in PROGRESS_KEYS if rec.get(k) is not None},
                                img_s=f"{rec['images_per_s']:.0f}", refresh=False)
                acc, acc_n, n_acc, t_window = {}, {}, 0, time.perf_counter()
            bar.update(1)
            if is_main and done % tc.checkpoint_every == 0 and done < tc.steps:
                final = checkpoint(done)
            if stop:  # the window up to here was logged above
                if is_main:
                    log.write_line(json.dumps({"event": "time_budget", "step": done, "seconds": max_seconds}))
                    print(f"\ntime budget of {max_seconds:.0f} s reached at step {done} of {tc.steps}",
                          file=sys.stderr)
                break
        if world > 1:
            check_ranks_in_sync(model)
        if is_main and (final is None or completed > start):
            final = checkpoint(completed)
    except KeyboardInterrupt:
        if is_main and completed > start:  # nothing lost: keep what the interrupted run learned
            path = checkpoint(completed)
            print(f"\ninterrupted: saved {path} (continue with --resume)", file=sys.stderr)
        raise
    finally:
        bar.close()
        if is_main:
            log.close()
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    return final if final is not None else run_dir / checkpoint_name(completed)


if __name__ == "__main__":  # python -m training.train (the README's and Makefile's form)
    from training.cli.train import main

    sys.exit(main())
