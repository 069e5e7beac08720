"""Checkpoint I/O, in one place: state dicts + config JSON + step + format version + the training
state that carries across steps. Atomic writes; ``weights_only=True`` loads; clear errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from training.config import KAEMConfig
from training.errors import ConfigError, KaemError
from training.io import load_torch_file, save_torch_file
from training.model.kaem import LatentImageModel

FORMAT = "kaem-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{7,})\.pt$")


class CheckpointError(KaemError):
    """A checkpoint is missing, truncated, foreign or from a newer format."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def save_checkpoint(path: str | Path, model: LatentImageModel, step: int,
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict[str, Any] | None = None) -> Path:
    """Write atomically: temp file in the same folder, fsync, rename (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_json": model.cfg.to_json(),
        "step": int(step),
        "model": _plain(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "train_state": dict(train_state or {}),
        "torch_version": str(torch.__version__),
    }
    return save_torch_file(path, payload)


def _plain(model: torch.nn.Module) -> LatentImageModel:
    return getattr(model, "module", model)  # unwrap DistributedDataParallel


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict; every failure is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} is a folder with no ckpt-*.pt files in it")
        path = latest
    ckpt = load_torch_file(path, "checkpoint", CheckpointError, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kaem checkpoint (no '{FORMAT}' format marker)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this software supports ({FORMAT_VERSION}): "
            "upgrade kaem-serve"
        )
    for key in ("config_json", "step", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks the '{key}' entry: incomplete checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def config_of(ckpt: dict[str, Any]) -> KAEMConfig:
    import json

    try:
        return KAEMConfig.from_dict(json.loads(ckpt["config_json"]))
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt.get('path')}: stored config is invalid: {err}") from err


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               kaem_only: bool = False) -> tuple[Any, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config (the only way a model is rebuilt): a KAEM,
    or a VAE / latent-EBM baseline. ``kaem_only`` refuses baselines with a clear error."""
    from training.model.registry import MODEL_NAMES, build_model  # deferred: it imports the loss modules

    ckpt = load_checkpoint(path, map_location)
    cfg = config_of(ckpt)
    if kaem_only and cfg.model != "kaem":
        raise CheckpointError(f"{ckpt['path']} holds a {MODEL_NAMES[cfg.model]} baseline, not a KAEM: "
                              "only KAEM checkpoints have an energy prior to export or plot")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt['path']}: weights do not match its config: {str(err)[:300]}") from err
    return model.to(map_location).eval(), ckpt


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step ``ckpt-XXXXXXX.pt`` in ``run_dir`` (None if there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def slim_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy of a checkpoint with the model only (no optimiser/training state): for shipping/serving."""
    model, ckpt = load_model(src)
    return save_checkpoint(dst, model, int(ckpt["step"]), None, {"slim_of": Path(ckpt["path"]).name})


if __name__ == "__main__":  # python -m training.checkpoint (the README's and Makefile's form)
    from training.cli.checkpoint import main

    sys.exit(main())
