"""Crash drills for training and export (reliability drills, item 3): a run killed with SIGKILL resumes to the
same weights as an uninterrupted one; a checkpoint with flipped bytes is refused by every command that reads it;
a full disk (a real small tmpfs, and an injected OSError) keeps the previous checkpoint or model version intact
and says so clearly."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from testpaths import ROOT

from training.checkpoint import CheckpointError, load_checkpoint
from training.io import StorageError, atomic_write_bytes

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _train(out: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [str(BIN / "kaem-train"), "--preset", "digits", "--steps", "120", "--set", "train.checkpoint_every=30",
           "--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)
    wall = {"train_seconds"}
    assert {k: v for k, v in a["train_state"].items() if k not in wall} == \
        {k: v for k, v in b["train_state"].items() if k not in wall}


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    full, killed = _train(tmp_path / "full"), _train(tmp_path / "killed")  # side by side: one core each
    first = tmp_path / "killed" / "ckpt-0000030.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)  # no handler runs: whatever was on disk is what survives
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in (tmp_path / "killed").glob("ckpt-*.pt"))
    assert left and "ckpt-0000120.pt" not in left, left  # killed mid-run, after its first checkpoint
    full_out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, full_out
    resumed = _train(tmp_path / "killed", "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    _same_state(load_checkpoint(tmp_path / "full" / "ckpt-0000120.pt"),
                load_checkpoint(tmp_path / "killed" / "ckpt-0000120.pt"))
    assert not list((tmp_path / "killed").glob(".*tmp*"))  # no half-written file from the kill is left over


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import get_preset, with_overrides
    from training.train import train

    cfg = with_overrides(get_preset("digits"), steps=20, seed=0)
    return train(cfg, tmp_path_factory.mktemp("run"), torch.device("cpu"), progress=False)


def _flip_middle(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_a_checkpoint_with_flipped_bytes_is_refused_by_every_command(digits_checkpoint: Path, tmp_path: Path) -> None:
    # torch.load itself reads such a file without complaint, as other weights (so: other images)
    bad = _flip_middle(digits_checkpoint, tmp_path / "flipped.pt")
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_checkpoint(bad)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bad, run / digits_checkpoint.name)
    commands = {
        "kaem-sample": ["--checkpoint", str(bad), "--out", str(tmp_path / "grid.png")],
        "kaem-export": ["--checkpoint", str(bad), "--model-repository", str(tmp_path / "repo")],
        "kaem-plot-prior": ["--checkpoint", str(bad), "--out", str(tmp_path / "priors.png")],
        "kaem-train": ["--preset", "digits", "--steps", "40", "--out", str(run), "--resume", "--no-progress"],
    }
    for name, args in commands.items():
        done = subprocess.run([str(BIN / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, (name, done.stderr)
        assert f"error: checkpoint {bad if name != 'kaem-train' else run / digits_checkpoint.name} is damaged" \
            in done.stderr, (name, done.stderr)
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "priors.png").exists()
    assert not (tmp_path / "repo").exists()


def test_an_injected_write_failure_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as caught:
        atomic_write_bytes(path, b"new" * 1000)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (f"cannot write {path}: No space left on device; the previous file, if any, is "
                                 "unchanged")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real size-limited filesystem (needs root, which this machine and CI have)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_while_training_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # digits checkpoints take 49 pages (~196 KiB) of tmpfs each and a run keeps 3: the 4th write cannot fit
    with _tmpfs(tmp_path / "small", "720k") as small:
        run = _train(small / "run", "--set", "train.checkpoint_every=10", "--set", "train.log_every=100")
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 2, out
        assert "Traceback" not in out
        assert f"error: cannot write {small / 'run' / 'ckpt-0000040.pt'}: No space left on device; the previous " \
               "file, if any, is unchanged" in out, out
        kept = sorted(p.name for p in (small / "run").glob("ckpt-*.pt"))
        assert kept == ["ckpt-0000010.pt", "ckpt-0000020.pt", "ckpt-0000030.pt"]
        assert load_checkpoint(small / "run" / kept[-1])["step"] == 30  # intact: its CRCs check out
        assert not list((small / "run").glob(".*tmp*"))


def test_a_full_disk_while_exporting_keeps_the_published_version(digits_checkpoint: Path, tmp_path: Path) -> None:
    from export.to_onnx import export_checkpoint

    with _tmpfs(tmp_path / "small", "2m") as small:
        repo = small / "repo"
        export_checkpoint(digits_checkpoint, repo, "kaem_digits")
        model_dir = repo / "kaem_digits"
        before = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
        free = shutil.disk_usage(small).free
        (small / "filler").write_bytes(b"\0" * (free - 8192))  # a few KiB left: config fits, the graph does not
        done = subprocess.run([str(BIN / "kaem-export"), "--checkpoint", str(digits_checkpoint),
                               "--model-repository", str(repo), "--model-name", "kaem_digits"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"error: cannot install the model under {model_dir}: No space left on device" in done.stderr
        after = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
        assert after == before  # version 1 and its config as they were, no version 2, no staging folder
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]


def test_a_full_disk_while_exporting_a_seed_model_keeps_both_models_at_one_version(digits_checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    """kaem-export --seed-model publishes two models: room for one graph but not both publishes neither, so the
    `u` model and its seed twin never serve different versions."""
    from export.module import ExportError
    from export.to_onnx import export_checkpoint

    with _tmpfs(tmp_path / "small", "4m") as small:
        repo = small / "repo"
        export_checkpoint(digits_checkpoint, repo, "kaem_digits", seed_model=True)
        dirs = [repo / "kaem_digits", repo / "kaem_digits_seed"]
        before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        graph = max((d / "1" / "model.onnx").stat().st_size for d in dirs)
        free = shutil.disk_usage(small).free
        (small / "filler").write_bytes(b"\0" * (free - graph - graph // 2))  # one graph fits, two do not
        with pytest.raises(ExportError, match="No space left on device"):
            export_checkpoint(digits_checkpoint, repo, "kaem_digits", seed_model=True)
        after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        assert after == before  # both at version 1 with their configs, no staging folder left
        assert [sorted(p.name for p in d.iterdir()) for d in dirs] == [["1", "config.pbtxt"]] * 2
        # a first export under new names that cannot fit leaves no model folder behind (a folder without a
        # config.pbtxt would fail the server's load)
        with pytest.raises(ExportError, match="No space left on device"):
            export_checkpoint(digits_checkpoint, repo, "kaem_new", seed_model=True)
        assert sorted(p.name for p in repo.iterdir()) == ["kaem_digits", "kaem_digits_seed"]
