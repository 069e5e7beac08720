"""serving/verify_repository.py, the production pod's init container: run as a copy in a directory of its own (as in
the image) on repositories written by the project's own config renderer, intact and damaged."""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.toy_model import TOY_CONTRACT
from export.triton_config import render_config, write_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def script(tmp_path: Path) -> Path:
    copy = tmp_path / "bin" / "verify_repository.py"
    copy.parent.mkdir()
    shutil.copy(ROOT / "serving" / "verify_repository.py", copy)
    return copy


def _repository(root: Path) -> Path:
    """Two models: "m" with versions 1 and 2 recorded (version 3's folder has no record: an export that predates
    digests), "legacy" with no record at all."""
    repo = root / "repo"
    graphs = {1: b"graph one", 2: b"graph two", 3: b"graph three"}
    for v, data in graphs.items():
        (repo / "m" / str(v)).mkdir(parents=True)
        (repo / "m" / str(v) / "model.onnx").write_bytes(data)
    artifacts = {v: {"sha256": hashlib.sha256(graphs[v]).hexdigest()} for v in (1, 2)}
    write_config(repo / "m", render_config("m", TOY_CONTRACT, artifacts=artifacts))
    (repo / "legacy" / "1").mkdir(parents=True)
    (repo / "legacy" / "1" / "model.onnx").write_bytes(b"old graph")
    write_config(repo / "legacy", render_config("legacy", TOY_CONTRACT))
    return repo


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(script), *args], capture_output=True, text=True, timeout=60,
                          cwd=script.parent)


def test_an_intact_repository_passes_with_one_line_per_model(script: Path, tmp_path: Path) -> None:
    done = _run(script, str(_repository(tmp_path)))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == ["verify-repository: legacy: no recorded sha256 to check",
                                        "verify-repository: m: version(s) 1, 2 match their recorded sha256"]


@pytest.mark.parametrize("damage", ["truncated", "replaced", "missing"])
def test_a_changed_or_missing_model_file_is_refused_in_one_line(script: Path, tmp_path: Path, damage: str) -> None:
    repo = _repository(tmp_path)
    target = repo / "m" / "2" / "model.onnx"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:4])
    elif damage == "replaced":  # another export's file, intact in itself
        shutil.copy(repo / "m" / "1" / "model.onnx", target)
    else:
        target.unlink()
    done = _run(script, str(repo))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"verify-repository: {target} ")
    assert ("is missing" if damage == "missing" else "the file changed after the export") in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_repository_errors_are_one_line_and_usage_errors_exit_2(script: Path, tmp_path: Path) -> None:
    for repo, why in [(tmp_path / "absent", "does not exist"), (tmp_path, "has no config.pbtxt")]:
        done = _run(script, str(repo))
        assert done.returncode == 1 and why in done.stderr and "Traceback" not in done.stderr, done.stderr
    bad = _repository(tmp_path / "bad")
    (bad / "m" / "config.pbtxt").write_text('name: "m"\nmax_batch_sise: 8\n')  # a misspelled field
    done = _run(script, str(bad))
    assert done.returncode == 1 and "config.pbtxt does not parse" in done.stderr, done.stderr
    assert _run(script, "--no-such-flag").returncode == 2


def test_the_script_imports_only_what_the_production_image_has() -> None:
    tree = ast.parse((ROOT / "serving" / "verify_repository.py").read_text())
    roots = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert roots - set(sys.stdlib_module_names) == {"google", "tritonclient"}
