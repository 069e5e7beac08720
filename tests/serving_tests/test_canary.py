"""kaem-canary against the real local Triton: the digest recorded at export (in-process onnxruntime) is what the
server returns for the canary seeds (exit 0); a version whose record disagrees fails the canary (exit 1); a
version exported without a record cannot be checked (exit 2, a clear message)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from export.contract import canary_sha256, canary_u
from export.to_onnx import canary_digest, ort_session, publish
from export.toy_model import TOY_CONTRACT, TOY_MAX_BATCH, TOY_MODEL, reference_images, write_toy_model
from export.triton_config import render_config
from serving.local.launcher import LocalTriton, free_ports

pytestmark = [pytest.mark.triton, pytest.mark.slow]
CANARY = Path(sys.executable).parent / "kaem-canary"


def _render(records):
    return render_config(TOY_MODEL, TOY_CONTRACT, max_batch_size=TOY_MAX_BATCH, artifacts=records)


def _canary(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CANARY), "--url", url, "--model", TOY_MODEL], capture_output=True, text=True,
                          timeout=60)


def test_canary_passes_on_the_exported_images_and_fails_on_others(tmp_path: Path) -> None:
    write_toy_model(tmp_path / "scratch")
    graph = tmp_path / "scratch" / "1" / "model.onnx"
    digest = canary_digest(ort_session(graph), TOY_CONTRACT)
    assert digest == canary_sha256(reference_images(graph, canary_u(TOY_CONTRACT))["images"])
    model_dir = tmp_path / "repo" / TOY_MODEL
    publish(graph, _render, model_dir, keep_versions=3)  # version 1, no canary recorded
    ports = free_ports(3)
    with LocalTriton(model_dir.parent, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                     log_file=tmp_path / "triton.log", model_control_mode="poll", repository_poll_secs=1) as server:
        unrecorded = _canary(server.grpc_url)
        assert unrecorded.returncode == 2 and "version 1 at" in unrecorded.stderr
        assert "has no recorded canary digest" in unrecorded.stderr
        assert "Traceback" not in unrecorded.stderr

        publish(graph, _render, model_dir, keep_versions=3, canary=digest)  # version 2: the true digest
        server_sees(server, "2")
        ok = _canary(server.grpc_url)
        assert ok.returncode == 0 and f"{TOY_MODEL!r} version 2" in ok.stdout and "exported images" in ok.stdout

        publish(graph, _render, model_dir, keep_versions=3, canary="0" * 64)  # version 3: a record it cannot match
        server_sees(server, "3")
        bad = _canary(server.grpc_url)
        assert bad.returncode == 1 and "MISMATCH" in bad.stderr and "version 3" in bad.stderr, bad.stderr


def server_sees(server: LocalTriton, version: str, timeout_s: float = 20.0) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + timeout_s
    while not client.is_model_ready(TOY_MODEL, model_version=version):
        assert time.monotonic() < deadline, f"version {version} not ready after {timeout_s} s"
        time.sleep(0.1)
    # the newest ready version is the one that answers (version_policy latest 1): wait for the old to unload
    while client.is_model_ready(TOY_MODEL, model_version=str(int(version) - 1)):
        assert time.monotonic() < deadline, f"version {int(version) - 1} still loaded after {timeout_s} s"
        time.sleep(0.1)
    time.sleep(2.5)  # two polls: publish changes the version folder, then config.pbtxt (a second reload)
    while not client.is_server_ready():
        assert time.monotonic() < deadline, f"server not ready after {timeout_s} s"
        time.sleep(0.1)
