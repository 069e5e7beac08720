"""Checkpoint I/O: round trip, atomic names, and clear errors for truncated, foreign and newer files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    slim_copy,
)
from training.config import get_preset
from training.model.kaem import KAEM


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[KAEM, Path]:
    model = KAEM(get_preset("digits"), init_seed=5)
    opt = torch.optim.Adam(model.parameters())
    path = save_checkpoint(tmp_path / "ckpt-0000007.pt", model, 7, opt, {"next_grid_update": 50})
    return model, path


def test_round_trip_rebuilds_from_stored_config(saved: tuple[KAEM, Path]) -> None:
    model, path = saved
    rebuilt, ckpt = load_model(path)
    assert ckpt["step"] == 7 and ckpt["train_state"] == {"next_grid_update": 50}
    assert rebuilt.cfg == model.cfg
    u = torch.rand(5, model.u_dim)
    with torch.no_grad():
        assert torch.equal(rebuilt.generate(u), model.eval().generate(u))
    assert not list(path.parent.glob(".*tmp*")), "temporary files must not survive a save"


def test_latest_and_directory_loading(saved: tuple[KAEM, Path], tmp_path: Path) -> None:
    model, path = saved
    save_checkpoint(tmp_path / "ckpt-0000012.pt", model, 12)
    assert latest_checkpoint(tmp_path).name == "ckpt-0000012.pt"
    assert load_checkpoint(tmp_path)["step"] == 12


def test_slim_copy_drops_optimizer(saved: tuple[KAEM, Path], tmp_path: Path) -> None:
    _, path = saved
    out = slim_copy(path, tmp_path / "slim.pt")
    ck = load_checkpoint(out)
    assert ck["optimizer"] is None and out.stat().st_size < path.stat().st_size


def test_truncated_file(saved: tuple[KAEM, Path], tmp_path: Path) -> None:
    _, path = saved
    bad = tmp_path / "cut.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(bad)


def test_foreign_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a kaem checkpoint"):
        load_checkpoint(other)


def test_newer_format_is_refused(saved: tuple[KAEM, Path], tmp_path: Path) -> None:
    _, path = saved
    ck = torch.load(path, weights_only=True)
    ck["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(ck, newer)
    with pytest.raises(CheckpointError, match="newer than this software supports"):
        load_checkpoint(newer)


def test_weights_not_matching_config(saved: tuple[KAEM, Path], tmp_path: Path) -> None:
    _, path = saved
    ck = torch.load(path, weights_only=True)
    ck["config_json"] = get_preset("fmnist").to_json()
    wrong = tmp_path / "wrong.pt"
    torch.save(ck, wrong)
    with pytest.raises(CheckpointError, match="weights do not match its config"):
        load_model(wrong)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no ckpt-"):
        load_checkpoint(tmp_path)
