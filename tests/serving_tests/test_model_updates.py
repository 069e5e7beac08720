"""Model updates on the real local Triton in poll mode (kaem-serve --model-control-mode poll): a new version
exported while perf_analyzer drives load fails no request (perf_analyzer stops at the first failed one, so a
completed run proves it), and kaem-export --rollback brings the previous version back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from export.contract import INPUT_U
from export.to_onnx import publish, rollback
from export.toy_model import TOY_CONTRACT, TOY_MAX_BATCH, TOY_MODEL, write_toy_model
from export.triton_config import render_config
from serving import loadtest
from serving.local.launcher import LocalTriton, free_ports
from serving.perf_data import write_perf_input

pytestmark = [pytest.mark.triton, pytest.mark.slow]
POLL_SECS = 1


def _render(shas):
    return render_config(TOY_MODEL, TOY_CONTRACT, max_batch_size=TOY_MAX_BATCH, artifacts=shas)


def _served_version(url: str) -> str:
    """The version that answers an inference request now (Triton names it in every response)."""
    client = grpcclient.InferenceServerClient(url)
    u = grpcclient.InferInput(INPUT_U, [1, TOY_CONTRACT.u_dim], "FP32")
    u.set_data_from_numpy(np.full((1, TOY_CONTRACT.u_dim), 0.5, dtype=np.float32))
    return client.infer(TOY_MODEL, [u]).get_response().model_version


def _wait_for_version(url: str, version: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while (served := _served_version(url)) != version:
        assert time.monotonic() - t0 < timeout_s, f"still serving version {served}, not {version}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_new_version_under_load_fails_nothing_and_rollback_serves_the_old_one(tmp_path: Path) -> None:
    write_toy_model(tmp_path / "scratch")
    graph = tmp_path / "scratch" / "1" / "model.onnx"
    model_dir = tmp_path / "repo" / TOY_MODEL
    assert publish(graph, _render, model_dir, keep_versions=2) == 1
    pa = loadtest.ensure_perf_analyzer()
    data = write_perf_input(tmp_path / "input.json", TOY_CONTRACT)
    ports = free_ports(3)
    with LocalTriton(model_dir.parent, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                     log_file=tmp_path / "triton.log", model_control_mode="poll",
                     repository_poll_secs=POLL_SECS) as server:
        assert _served_version(server.grpc_url) == "1"
        outcome: dict[str, object] = {}

        def load() -> None:  # three 10 s windows at 4 in flight (any spread counts as stable): 30 s of traffic
            try:
                outcome["row"] = loadtest.run_level(pa, server.grpc_url, TOY_MODEL, 4, 1, data, tmp_path / "pa.csv",
                                                    measurement_interval_ms=10000, stability_pct=1000, max_trials=3)
            except loadtest.LoadTestError as err:
                outcome["error"] = err

        runner = threading.Thread(target=load)
        runner.start()
        time.sleep(3)
        assert publish(graph, _render, model_dir, keep_versions=2) == 2
        swap_s = _wait_for_version(server.grpc_url, "2", timeout_s=10 * POLL_SECS + 10)
        assert runner.is_alive()  # the swap happened under load
        runner.join(120)
        assert not runner.is_alive() and "error" not in outcome, outcome.get("error")
        row = outcome["row"]
        assert float(row["Inferences/Second"]) > 0  # perf_analyzer completed: not one request failed
        assert server.running

        removed, served = rollback(model_dir)
        assert (removed, served) == (2, 1)
        back_s = _wait_for_version(server.grpc_url, "1", timeout_s=10 * POLL_SECS + 10)
        print(f"version 2 served {swap_s:.2f} s after its export; version 1 again {back_s:.2f} s after the rollback")
