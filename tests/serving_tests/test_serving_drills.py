"""Serving drills on the real Triton 2.51 server (reliability drills, items 3 and 4): a corrupt new model version
on a running server leaves the previous version serving and is reported; a server killed while loading and
restarted is waited out by ``kaem-generate --deadline/--retries``, and without a restart the client ends with a
clear error and no PNG; every server port listens on loopback only by default.

(A corrupt ``model.onnx`` at cold start is refused by ``kaem-serve``, naming the file:
tests/serving_tests/test_triton_live.py::test_kaem_serve_refuses_a_model_file_that_is_not_the_exported_one.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from testpaths import ROOT

from export.contract import INPUT_U, OUTPUT_IMAGES
from export.toy_model import TOY_CONTRACT, TOY_MAX_BATCH, TOY_MODEL, build_toy_repository
from export.triton_config import render_config, write_config
from serving.local.launcher import LaunchError, LocalTriton, build_parser, free_ports

pytestmark = [pytest.mark.triton, pytest.mark.slow]
BIN = Path(sys.executable).parent
LOOPBACK = ("0100007F", "0000000000000000FFFF00000100007F")  # 127.0.0.1 and ::ffff:127.0.0.1 as /proc/net has them


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net writes them) of the sockets listening on ``port``, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.append(address.rsplit(":", 1)[0])
    return found


def test_every_server_port_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    assert build_parser().parse_args([]).host == "127.0.0.1"  # kaem-serve's default
    ports = free_ports(3)
    with LocalTriton(build_toy_repository(tmp_path), *ports, log_file=tmp_path / "log") as server:
        assert server.host == "127.0.0.1"
        for port in ports:  # 127.0.0.1 (the metrics port as IPv4-mapped IPv6, ::ffff:127.0.0.1), nothing else
            addresses = _listening(port)
            assert len(addresses) == 1 and addresses[0] in LOOPBACK, (port, addresses)


def _index(http_url: str) -> list[dict]:
    req = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _served_version(grpc: grpcclient.InferenceServerClient) -> str:
    inp = grpcclient.InferInput(INPUT_U, [1, TOY_CONTRACT.u_dim], "FP32")
    inp.set_data_from_numpy(np.full((1, TOY_CONTRACT.u_dim), 0.5, np.float32))
    result = grpc.infer(TOY_MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(OUTPUT_IMAGES)],
                        client_timeout=10)
    return result.get_response().model_version


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_corrupt_new_version_on_a_running_server_keeps_the_old_one_serving(tmp_path: Path, damage: str) -> None:
    # truncated: not an ONNX file any more, onnxruntime refuses it; flipped: 256 bytes inside the weights, still a
    # valid graph (it would serve other images), refused because its sha256 is not the one its export recorded
    repo = build_toy_repository(tmp_path)
    model_dir = repo / TOY_MODEL
    ports = free_ports(3)
    log = tmp_path / "tritonserver.log"
    with LocalTriton(repo, *ports, log_file=log, model_control_mode="poll", repository_poll_secs=1) as server:
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        assert _served_version(grpc) == "1"
        good = (model_dir / "1" / "model.onnx").read_bytes()
        bad = bytearray(good)
        if damage == "truncated":
            del bad[len(bad) // 2:]
        else:
            bad[len(bad) // 2: len(bad) // 2 + 256] = b"\xff" * 256
        digest = hashlib.sha256(good).hexdigest()  # what kaem-export records for version 2
        write_config(model_dir, render_config(TOY_MODEL, TOY_CONTRACT, max_batch_size=TOY_MAX_BATCH,
                                              artifacts={1: {"sha256": digest}, 2: {"sha256": digest}}))
        staging = model_dir / ".v2-staging"  # the file appears whole, as kaem-export publishes
        staging.mkdir()
        (staging / "model.onnx").write_bytes(bytes(bad))
        os.replace(staging, model_dir / "2")
        deadline, state = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            state = {e.get("version"): e for e in _index(server.http_url) if e["name"] == TOY_MODEL}
            if state.get("2", {}).get("state") == "UNAVAILABLE":
                break
            time.sleep(0.5)
        # the failure is reported: the repository index says why version 2 is not served, and so does the log
        assert state.get("2", {}).get("state") == "UNAVAILABLE", state
        reason = state["2"].get("reason", "")
        assert (str(model_dir / "2" / "model.onnx") in reason) if damage == "flipped" else reason, state
        assert "failed to load" in log.read_text()
        for _ in range(20):  # the previous version keeps answering, every time
            assert _served_version(grpc) == "1"
        assert server.running
        grpc.close()


def _generate(url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "kaem-generate"), "--url", url, "--model", TOY_MODEL, "--seeds", "0-3",
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _kill_while_loading(server: LocalTriton) -> None:
    """Start ``server`` and SIGKILL its process before it is ready (while it loads its models)."""
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except LaunchError as err:  # expected: it died while starting
            failed.append(err)

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 30
    while server.process is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    thread.join(60)
    assert failed, "the server became ready before it could be killed"


def test_a_server_killed_while_loading_is_waited_out_by_retries_or_reported(tmp_path: Path) -> None:
    repo = build_toy_repository(tmp_path)
    ports = free_ports(3)
    _kill_while_loading(LocalTriton(repo, *ports, log_file=tmp_path / "first.log"))

    # no server comes back: a clear error within the deadline, and no PNG
    lost = tmp_path / "lost.png"
    t0 = time.monotonic()
    done = _generate(f"127.0.0.1:{ports[0]}", lost, "--deadline", "4", "--retries", "3", "--timeout", "2")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - t0 < 30
    assert not lost.exists() and not list(tmp_path.glob(".lost.png*"))

    # the server restarts a few seconds later: the client's retries carry it over. (Started from this thread: the
    # launcher ties the server's life to the thread that started it, PR_SET_PDEATHSIG.)
    out = tmp_path / "ok.png"
    waiting = subprocess.Popen([str(BIN / "kaem-generate"), "--url", f"127.0.0.1:{ports[0]}", "--model", TOY_MODEL,
                                "--seeds", "0-3", "--out", str(out), "--deadline", "90", "--retries", "50",
                                "--timeout", "5"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    assert waiting.poll() is None  # still trying
    with LocalTriton(repo, *ports, log_file=tmp_path / "second.log"):
        stdout, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, (stdout, stderr)
    with Image.open(out) as img:
        assert img.size[0] > 0 and img.mode in ("L", "RGB")
