"""The soak benchmark's --short mode (20 s warm-up + 60 s measured at concurrency 16) on the real local Triton: the
shipped model passes the memory, failed-request and /dev/shm targets (the tail-latency ratio is reported, not
gated), and a Python-backend model that keeps 16 KB per request is flagged for its memory growth; user mistakes
exit 2.

The two --short runs go side by side (two servers, two perf_analyzers), both pinned to one core (the last one this
process may use): their 80 s are fixed, so sharing one core halves their wall clock in the test suite and leaves
the other core to the suite's other worker. The memory targets count per request and per server process tree, and
each run's /dev/shm check leaves out regions another live process maps, so sharing a core changes their
throughput, not their verdicts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testpaths import ROOT, SHIPPED_CHECKPOINT

SOAK = [sys.executable, "benchmarks/soak.py"]
LEAKY_MODEL = "kaem_leaky"
LEAKY_SOURCE = Path(__file__).with_name("leaky_model.py")
KEPT_BYTES_PER_REQUEST = 16 * 1024  # leaky_model.py
TARGETS = ("memory growth", "p99 last 20 % / first 20 %", "failed requests", "/dev/shm after the stop")


def _soak(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SOAK, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Both --short runs, started together: {"real": (process, summary JSON), "leaky": (...)}."""
    tmp = tmp_path_factory.mktemp("soak")
    runs = {"real": ["--short"], "leaky": ["--short", "--model-repository", str(_leaky_repository(tmp)),
                                           "--model", LEAKY_MODEL]}
    core = {max(os.sched_getaffinity(0))}  # inherited by the servers, their stubs and perf_analyzer
    procs = {name: subprocess.Popen([*SOAK, *args, "--json", str(tmp / f"{name}.json")], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=lambda: os.sched_setaffinity(0, core))
             for name, args in runs.items()}
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=500)
            done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), tmp / f"{name}.json")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _verdicts(out: str) -> dict[str, str]:
    """{target: PASS/FAIL} from the printed target lines."""
    found = dict(re.findall(r"^  (\S[^:]*?): .*\s(PASS|FAIL)$", out, re.M))
    assert sorted(found) == sorted(TARGETS), out
    return found


def _check_summary(s: dict) -> None:
    """What holds for any completed run: consistent numbers and the samples behind them."""
    assert s["requests"] > 1000 and s["requests_total"] > s["requests"], s
    # 5 perf_analyzer windows of 1.2 x 10 s, and its own work between them, which grows when the cores are shared
    # (74 s seen beside the other soak run and the test suite's second worker); the window count is checked below
    assert 58 < s["measured_s"] < 90, s
    assert len(s["windows"]) == 5 and s["p99_first_ms"] == s["windows"][0]["p99_ms"], s
    assert s["p99_last_ms"] == s["windows"][-1]["p99_ms"] and s["p99_ratio"] == pytest.approx(
        s["p99_last_ms"] / s["p99_first_ms"], abs=1e-3)
    assert s["growth_10min_mb"] == pytest.approx(s["growth_mb"] * 600 / s["measured_s"], rel=0.01), s
    samples = s["rss_samples"]
    assert len(samples) >= 75, len(samples)  # once a second through warm-up and measured phase
    assert all(0.5 < b[0] - a[0] < 2.5 for a, b in zip(samples, samples[1:], strict=False)), samples
    assert s["processes"] >= 2, s  # tritonserver and its Python-backend stub
    assert s["shm_server_regions"], s  # the stub's region was seen mapped by the server
    assert s["processes_left_running"] == [], s


@pytest.mark.slow
@pytest.mark.triton
def test_soak_short_real_model_passes(short_runs) -> None:
    proc, out = short_runs["real"]
    verdicts = _verdicts(proc.stdout)
    # The tail-latency ratio is a timing on a shared machine: the benchmark reports it, the test does not gate on
    # it (another process's busy spell in the last window is not a regression). Every other target must pass.
    timing = "p99 last 20 % / first 20 %"
    assert {k: v for k, v in verdicts.items() if k != timing} == dict.fromkeys(set(TARGETS) - {timing}, "PASS"), \
        proc.stdout
    assert proc.returncode == (0 if verdicts[timing] == "PASS" else 1), proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    _check_summary(s)
    assert s["passed"] is (verdicts[timing] == "PASS"), s
    assert s["failures"] == 0 and s["perf_analyzer_errors"] == [], s
    assert s["growth_10min_mb"] <= 40 and s["growth_mb"] <= 40, s
    assert s["p99_first_ms"] > 0 and s["p99_last_ms"] > 0, s
    assert s["shm_clean"] is True and s["shm_left_by_server"] == [] and s["shm_left_orphaned"] == [], s
    assert not set(s["shm_server_regions"]) & set(s["shm_after"]), s


def _leaky_repository(root: Path) -> Path:
    """A repository holding the leaking Python model, with the shipped model's contract (so perf_analyzer's input
    data, built from the config's contract, is what the real model takes)."""
    from google.protobuf import text_format

    from export.to_onnx import contract_for
    from export.triton_config import parse_config, render_config, write_config
    from training.checkpoint import load_model

    contract = contract_for(load_model(SHIPPED_CHECKPOINT, kaem_only=True)[0])
    cfg = parse_config(render_config(LEAKY_MODEL, contract))
    cfg.backend = "python"
    model_dir = root / "repo" / LEAKY_MODEL
    (model_dir / "1").mkdir(parents=True)
    write_config(model_dir, text_format.MessageToString(cfg))
    shutil.copy(LEAKY_SOURCE, model_dir / "1" / "model.py")
    return root / "repo"


@pytest.mark.slow
@pytest.mark.triton
def test_soak_short_flags_a_leaking_model(short_runs) -> None:
    proc, out = short_runs["leaky"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _verdicts(proc.stdout)["memory growth"] == "FAIL", proc.stdout
    assert re.search(r"^result: FAIL \(.*memory growth.*\)$", proc.stdout, re.M), proc.stdout
    s = json.loads(out.read_text())
    _check_summary(s)
    assert s["passed"] is False and s["targets"]["memory_growth"] is False, s
    assert s["growth_mb"] > 40 and s["growth_10min_mb"] > 40, s
    # the fitted growth is the model's 16 KB per request: the measurement sees the leak, not noise
    kept_mb = s["requests"] * KEPT_BYTES_PER_REQUEST / 2**20
    assert 0.8 * kept_mb < s["growth_mb"] < 1.3 * kept_mb, (kept_mb, s["growth_mb"])
    assert s["rss_end_mb"] - s["rss_start_mb"] > 40, s
    # leaking is all it does wrong: no request failed and its shared memory went away with the server
    assert s["failures"] == 0 and s["targets"]["failed_requests"] is True, s
    assert s["shm_clean"] is True, s


def test_soak_user_mistakes_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["--checkpoint", str(tmp_path / "missing.pt")], "error: checkpoint"),
        (["--model-repository", str(tmp_path / "nowhere")], "error: model repository"),
        (["--model-repository", str(tmp_path), "--model", "absent"], "error: no "),
        (["--short", "--minutes", "2"], "--short fixes the lengths"),
        (["--minutes", "0.1"], "at least 10 s"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
    ]:
        proc = _soak(*args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
