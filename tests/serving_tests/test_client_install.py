"""The gRPC client installs and runs without torch: a fresh virtual environment with only
``pip install .[client]`` (numpy, Pillow, tritonclient, prometheus-client) writes a PNG from the real local
Triton, pixel for pixel what the project's own client gets, and cannot import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testpaths import ROOT

from export.toy_model import TOY_MODEL, build_toy_repository
from serving import client
from serving.local.launcher import LocalTriton, free_ports


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.mark.slow
@pytest.mark.triton
def test_client_extra_installs_without_torch_and_generates(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c",
                          str(ROOT / "constraints.txt"), f"{ROOT}[client]"], capture_output=True, text=True,
                         timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.stdout.strip() == "True", "the client extra pulled in torch"
    print(f"client-only venv: {_size_mb(venv):.0f} MB")  # shown with -s; the closing note reports it

    repo = build_toy_repository(tmp_path / "repo")
    out = tmp_path / "grid.png"
    grpc_port, http_port, metrics_port = free_ports(3)
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
        r = subprocess.run([str(venv / "bin" / "kaem-generate"), "--url", server.grpc_url, "--model", TOY_MODEL,
                            "--seeds", "0-3", "--out", str(out), "--upscale", "1"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        images, _ = client.generate_images(server.grpc_url, TOY_MODEL, [0, 1, 2, 3])
    grid = np.asarray(Image.open(out))
    h, w = images.shape[1:3]
    assert np.array_equal(grid[2 : 2 + h, 2 : 2 + w], images[0, :, :, 0])
