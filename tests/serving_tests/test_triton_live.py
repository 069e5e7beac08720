"""The real Triton 2.51 server (nvidia-pytriton binary + onnxruntime shim) on the toy repository:
parity with in-process onnxruntime, dynamic batching, errors, metrics, the client's contract check,
kaem-serve's messages, a short perf_analyzer sweep and the benchmark's quick mode.

One server per module (starting one takes seconds); tests that need another start their own."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from processes import alive, children
from testpaths import ROOT
from tritonclient.utils import InferenceServerException

from export.contract import INPUT_U, OUTPUT_IMAGES, OUTPUT_MEAN, ContractError
from export.toy_model import (
    TOY_CONTRACT,
    TOY_MAX_BATCH,
    TOY_MODEL,
    build_toy_repository,
    reference_images,
    write_toy_model,
    wrong_contract_config,
)
from export.triton_config import file_sha256, render_config, write_config
from serving import client, loadtest, metrics
from serving.local import launcher
from serving.local.launcher import LaunchError, LocalTriton, check_ports, free_ports
from serving.local.triton_env import LOCAL_TRITON_VERSION
from training.uniforms import U_EPS

pytestmark = pytest.mark.triton

WRONG = "kaem_wrong_contract"
D = TOY_CONTRACT.u_dim


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = build_toy_repository(tmp_path_factory.mktemp("live"))
    write_toy_model(repo / WRONG, config_text=wrong_contract_config(WRONG))
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    grpc_port, http_port, metrics_port = free_ports(3)
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                     log_file=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def grpc(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _infer(c: grpcclient.InferenceServerClient, u: np.ndarray, model: str = TOY_MODEL, dtype: str = "FP32",
           outputs: tuple[str, ...] = (OUTPUT_IMAGES, OUTPUT_MEAN)):
    inp = grpcclient.InferInput(INPUT_U, list(u.shape), dtype)
    inp.set_data_from_numpy(u)
    return c.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])


def _sanitized(u: np.ndarray) -> np.ndarray:
    return np.clip(np.where(np.isnan(u), 0.5, u), U_EPS, 1 - U_EPS).astype(np.float32)


def test_server_is_the_local_release(grpc):
    assert grpc.get_server_metadata().version == LOCAL_TRITON_VERSION


def test_images_equal_in_process_onnxruntime(server, repo):
    seeds = list(range(100, 137))  # 37 images: 3 requests of <= 16 rows, the last one partial
    images, stats = client.generate_images(server.grpc_url, TOY_MODEL, seeds, batch_size=16, concurrency=2)
    ref = reference_images(repo / TOY_MODEL / "1" / "model.onnx", client.u_for_contract(seeds, TOY_CONTRACT))
    assert images.dtype == np.uint8 and images.shape == (37, 12, 12, 1)
    assert np.array_equal(images, ref[OUTPUT_IMAGES])
    assert stats.requests == 3 and stats.images == 37 and stats.latency_quantile(0.5) > 0
    assert images.std() > 10  # not a constant image


def test_only_the_requested_output_comes_back(grpc):
    result = _infer(grpc, client.u_for_contract([1, 2], TOY_CONTRACT), outputs=(OUTPUT_IMAGES,))
    assert result.as_numpy(OUTPUT_IMAGES).shape == (2, 12, 12, 1) and result.as_numpy(OUTPUT_MEAN) is None


def test_nan_and_out_of_range_u_give_valid_images(grpc, repo):
    u = client.u_for_contract(range(6), TOY_CONTRACT)
    u[0, 0], u[1, :] = np.nan, np.nan
    u[2, 1], u[3, 2], u[4, 3], u[5, D - 1] = -3.0, 7.0, np.inf, -np.inf
    result = _infer(grpc, u)
    mean = result.as_numpy(OUTPUT_MEAN)
    assert np.isfinite(mean).all() and mean.min() >= 0 and mean.max() <= 1
    ref = reference_images(repo / TOY_MODEL / "1" / "model.onnx", _sanitized(u))
    assert np.array_equal(result.as_numpy(OUTPUT_IMAGES), ref[OUTPUT_IMAGES])


def test_dynamic_batching_merges_concurrent_requests(server):
    before = metrics.read_settled(server.metrics_url, TOY_MODEL)
    images, _ = client.generate_images(server.grpc_url, TOY_MODEL, list(range(256)), batch_size=1, concurrency=16)
    window = metrics.delta(metrics.read_settled(server.metrics_url, TOY_MODEL), before)[TOY_MODEL]["1"]
    assert images.shape[0] == 256 and window["success"] == 256 and window["inference_count"] == 256
    assert window["exec_count"] < 256 and window["avg_batch_size"] > 1.0


@pytest.mark.parametrize("case, message", [
    ("shape", f"Expected [-1,{D}], got [2,{D - 1}]"), ("dtype", "data-type is 'FP64', but model 'kaem_toy' expects"),
    ("batch", f"batch-size must be <= {TOY_MAX_BATCH}"), ("model", "unknown_model")])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(grpc, case, message):
    u = {"shape": np.full((2, D - 1), 0.5, np.float32), "dtype": np.full((2, D), 0.5),
         "batch": np.full((TOY_MAX_BATCH + 1, D), 0.5, np.float32), "model": np.full((1, D), 0.5, np.float32)}[case]
    with pytest.raises(InferenceServerException) as err:
        _infer(grpc, u, model="unknown_model" if case == "model" else TOY_MODEL,
               dtype="FP64" if case == "dtype" else "FP32")
    assert message in err.value.message()
    assert _infer(grpc, np.full((3, D), 0.5, np.float32)).as_numpy(OUTPUT_IMAGES).shape == (3, 12, 12, 1)


def test_metrics_count_requests_and_rows(server, grpc, capsys):
    before = metrics.read_settled(server.metrics_url)
    for n in (1, 5, 10):
        _infer(grpc, client.u_for_contract(range(n), TOY_CONTRACT))
    after = metrics.read_settled(server.metrics_url)
    window = metrics.delta(after, before)[TOY_MODEL]["1"]
    assert (window["success"], window["inference_count"], window["failed"]) == (3, 16, 0)
    s = after[TOY_MODEL]["1"]
    assert s["p50_us"] > 0 and s["p99_us"] >= s["p50_us"] and s["avg_compute_us"] > 0
    assert metrics.main(["--url", server.metrics_url, "--model", TOY_MODEL]) == 0
    out = capsys.readouterr().out
    assert TOY_MODEL in out and WRONG not in out and "avg batch" in out


def test_client_refuses_a_mismatched_contract(server, capsys):
    with pytest.raises(ContractError, match=f"refusing model '{WRONG}'.*kaem-serve-contract-v0"):
        client.generate_images(server.grpc_url, WRONG, [0])
    assert client.main(["--url", server.grpc_url, "--model", WRONG, "--seeds", "0-3"]) == 2
    err = capsys.readouterr().err
    assert "error: refusing model" in err and "Traceback" not in err


def test_generate_cli_writes_grid_and_per_seed_pngs(server, tmp_path, capsys):
    out, out_dir = tmp_path / "grid.png", tmp_path / "each"
    argv = ["--url", server.grpc_url, "--model", TOY_MODEL, "--seeds", "3-7,42", "--out", str(out),
            "--out-dir", str(out_dir), "--concurrency", "2", "--batch-size", "4"]
    assert client.main(argv) == 0
    assert "images/s" in capsys.readouterr().out
    images, _ = client.generate_images(server.grpc_url, TOY_MODEL, [3, 4, 5, 6, 7, 42])
    assert np.array_equal(np.asarray(Image.open(out_dir / "seed000042.png")), images[-1, :, :, 0])
    assert Image.open(out).size[0] >= 96 * 3  # 3 columns of upscaled 12-pixel images


def test_generate_runs_with_torch_unimportable(server, tmp_path):
    # The client needs no torch: with a `torch` package on the path that refuses to import, kaem-generate still
    # reads the contract, turns seeds into u and writes the same pixels the in-process client gets.
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("torch is not installed in this environment")\n')
    out = tmp_path / "grid.png"
    code = ("import sys\nfrom serving.client import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'the client imported torch'\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--url", server.grpc_url, "--model", TOY_MODEL, "--seeds", "0-3",
                        "--out", str(out), "--upscale", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"})
    assert r.returncode == 0, r.stdout + r.stderr
    images, _ = client.generate_images(server.grpc_url, TOY_MODEL, [0, 1, 2, 3])
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[2 : 2 + images.shape[1], 2 : 2 + images.shape[2]], images[0, :, :, 0])


def _kaem_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.local.launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_kaem_serve_says_when_the_port_is_taken(server, repo):
    done = _kaem_serve("--model-repository", str(repo), "--grpc-port", str(server.grpc_port),
                       "--http-port", str(free_ports(1)[0]), "--metrics-port", str(free_ports(1)[0]))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"gRPC port {server.grpc_port} on 127.0.0.1 is already in use" in done.stderr
    assert "--grpc-port" in done.stderr


def test_kaem_serve_says_when_the_repository_is_empty_or_unexported(tmp_path, capsys):
    # in-process main(): a return code instead of an exception proves there was no traceback
    (tmp_path / "empty").mkdir()
    assert launcher.main(["--model-repository", str(tmp_path / "empty")]) == 2
    assert "error: model repository" in (err := capsys.readouterr().err) and "is empty" in err
    assert launcher.main(["--model-repository", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = build_toy_repository(tmp_path / "noonnx") / TOY_MODEL
    (model / "1" / "model.onnx").unlink()
    assert launcher.main(["--model-repository", str(model.parent)]) == 2
    err = capsys.readouterr().err
    assert "version 1 has no model.onnx" in err and "export the model first" in err
    fresh = tmp_path / "fresh" / "kaem_fmnist" / "1"  # a clean clone: the placeholder folder only
    fresh.mkdir(parents=True)
    (fresh / ".gitkeep").touch()
    assert launcher.main(["--model-repository", str(fresh.parent.parent), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model 'kaem_fmnist'" in err and "has not been exported yet: run make demo" in err


def test_kaem_serve_refuses_a_model_file_that_is_not_the_exported_one(tmp_path, capsys):
    model = build_toy_repository(tmp_path) / TOY_MODEL
    onnx_file = model / "1" / "model.onnx"
    config = render_config(TOY_MODEL, TOY_CONTRACT, max_batch_size=TOY_MAX_BATCH,
                           artifacts={1: {"sha256": file_sha256(onnx_file)}})
    write_config(model, config)
    assert launcher.main(["--model-repository", str(model.parent), "--dry-run"]) == 0  # the recorded digest matches
    capsys.readouterr()
    onnx_file.write_bytes(onnx_file.read_bytes()[:-100])  # a truncated copy
    assert launcher.main(["--model-repository", str(model.parent), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{onnx_file} has sha256" in err and "its export recorded" in err and "export it again" in err


def test_a_model_that_fails_to_load_is_reported_with_log_lines(tmp_path):
    repo = build_toy_repository(tmp_path)
    (repo / TOY_MODEL / "1" / "model.onnx").write_bytes(b"not an onnx file")
    grpc_port, http_port, metrics_port = free_ports(3)
    with pytest.raises(LaunchError) as err:
        LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                    log_file=tmp_path / "log.txt").start()
    text = str(err.value)
    assert "exited during startup" in text and TOY_MODEL in text and "UNAVAILABLE" in text


def test_start_warms_the_grpc_frontend_with_one_request(repo, tmp_path):
    """start() returns after one gRPC inference to the first model (the first real request would otherwise pay
    for the frontend's first inference); Triton counts it as one request of that model and of no other."""
    counts = {}
    for grpc_warmup in (False, True):
        ports = free_ports(3)
        with LocalTriton(repo, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2], grpc_warmup=grpc_warmup,
                         log_file=tmp_path / f"log-{grpc_warmup}.txt") as srv:
            assert srv.warmed == (TOY_MODEL if grpc_warmup else None)
            counts[grpc_warmup] = metrics.read_settled(srv.metrics_url)
    for model, extra in ((TOY_MODEL, 1), (WRONG, 0)):
        with_, without = counts[True][model]["1"], counts[False][model]["1"]
        assert (with_["success"] - without["success"], with_["failed"], without["failed"]) == (extra, 0, 0), model


def test_warmup_script_sends_one_request_per_model_and_runs_standalone(server, tmp_path):
    """The production startup probe's script (copied alone into the image): exit 0 once every loaded model answered
    one batch-1 request, which Triton counts; run as a copy in a directory of its own, as in the image."""
    script = tmp_path / "warmup.py"
    shutil.copy(ROOT / "serving" / "warmup.py", script)
    before = metrics.read_settled(server.metrics_url)
    done = subprocess.run([sys.executable, "-I", str(script), "--url", server.grpc_url], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"warm-up: one request each to {', '.join(sorted((TOY_MODEL, WRONG)))}"
    after = metrics.read_settled(server.metrics_url)
    for model in (TOY_MODEL, WRONG):
        assert after[model]["1"]["success"] - before[model]["1"]["success"] == 1, model
        assert after[model]["1"]["failed"] == before[model]["1"]["failed"], model


def test_warmup_script_fails_in_one_line_without_a_server(tmp_path):
    (port,) = free_ports(1)
    done = subprocess.run([sys.executable, "-I", str(ROOT / "serving" / "warmup.py"), "--url", f"127.0.0.1:{port}",
                           "--timeout", "2"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"warm-up: no answer from a Triton server at 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_warmup_script_imports_only_what_the_production_image_has():
    tree = ast.parse((ROOT / "serving" / "warmup.py").read_text())
    roots = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert roots - set(sys.stdlib_module_names) == {"numpy", "tritonclient"}


def test_kaem_serve_runs_until_sigterm_and_stops_cleanly(repo, tmp_path):
    ports = free_ports(3)
    args = ["--model-repository", str(repo), "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
            "--metrics-port", str(ports[2]), "--log-file", str(tmp_path / "log.txt")]
    proc = subprocess.Popen([sys.executable, "-m", "serving.local.launcher", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # blocks until ready (or exit)
        assert "Triton ready with models" in line, proc.stderr.read() if proc.poll() is not None else line
        images, _ = client.generate_images(f"127.0.0.1:{ports[0]}", TOY_MODEL, [0, 1])
        assert images.shape == (2, 12, 12, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0 and "stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    check_ports("127.0.0.1", {"gRPC": ports[0], "HTTP": ports[1], "metrics": ports[2]})


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_server(repo, tmp_path):
    ports = free_ports(3)
    args = ["--model-repository", str(repo), "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
            "--metrics-port", str(ports[2]), "--log-file", str(tmp_path / "log.txt")]
    # Ctrl-C as a terminal sends it: SIGINT with Python's default handler (a background test runner may ignore it)
    proc = subprocess.Popen([sys.executable, "-m", "serving.local.launcher", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "Triton ready with models" in line, proc.stderr.read() if proc.poll() is not None else line
        (server_pid,) = children(proc.pid)
        proc.send_signal(signal.SIGINT)
        first = proc.stderr.readline()
        while first and not first.startswith("kaem-serve:"):  # gRPC's own log lines may come first
            first = proc.stderr.readline()
        assert "stopping" in first and "Ctrl-C again" in first, first
        proc.send_signal(signal.SIGINT)  # during the drain: Triton takes a second or more to exit
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert "stopped at once" in rest and "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive(server_pid)  # no orphaned tritonserver
    check_ports("127.0.0.1", {"gRPC": ports[0], "HTTP": ports[1], "metrics": ports[2]})


def test_loadtest_short_sweep_completes(server, tmp_path, capsys):
    try:
        loadtest.ensure_perf_analyzer()
    except loadtest.LoadTestError as err:  # offline machine: say so instead of failing on the network
        pytest.skip(f"perf_analyzer unavailable: {err}")
    argv = ["--url", server.grpc_url, "--metrics-url", server.metrics_url, "--model", TOY_MODEL,
            "--concurrency", "1,8", "--measurement-interval", "400", "--stability", "100", "--max-trials", "4",
            "--out-dir", str(tmp_path)]
    assert loadtest.main(argv) == 0, capsys.readouterr().err
    rows = (tmp_path / "loadtest.csv").read_text().splitlines()
    assert rows[0].startswith("concurrency,batch_size,infer_per_s") and len(rows) == 3
    c8 = dict(zip(rows[0].split(","), rows[2].split(","), strict=True))
    assert float(c8["infer_per_s"]) > 0 and float(c8["server_avg_batch"]) >= 1 and float(c8["server_failed"]) == 0
    assert float(c8["client_cpu_us"]) > 0 and c8["server_cpu_us"] == ""  # a server given by URL: client CPU only
    report = (tmp_path / "report.md").read_text()
    assert "| 8 |" in report and "server avg batch" in report and "client CPU µs/inference" in report
    # with the local server's pid, the server's CPU per inference too, and the ceiling they put on throughput
    rows = loadtest.sweep(server.grpc_url, server.metrics_url, TOY_MODEL, [2], 1, tmp_path / "own", 400, 100.0, 4,
                          server_pid=server.process.pid)
    assert rows[0]["server_cpu_us"] > 0 and rows[0]["client_cpu_us"] > 0
    loadtest.write_results(rows, tmp_path / "own", {"model": TOY_MODEL})
    assert "throughput cannot pass about" in (tmp_path / "own" / "report.md").read_text()


def test_benchmark_quick_mode(server, repo):
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks" / "serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    onnx_path = bench.latest_onnx(repo, TOY_MODEL)
    r = bench.run_benchmark(server.grpc_url, server.metrics_url, TOY_MODEL, onnx_path, quick=True)
    assert all(r[k] > 0 for k in ("ort_b64", "triton_b64", "triton_b1_c1", "triton_b1_c16"))
    assert r["server_batch_c1"] == pytest.approx(1.0) and r["server_batch_c16"] >= 1.0
    # the batch-64 overhead: Triton vs an in-process session with the config's options, 5 interleaved reps
    assert r["b64_reps"] == 5 and r["b64_ort_ms"] > 0 and r["b64_triton_ms"] > 0
    assert r["b64_overhead_min_ms"] <= r["b64_overhead_ms"] <= r["b64_overhead_max_ms"]
    text = bench.format_results(r, TOY_MODEL)
    assert "x" in text and "Triton overhead per batch-64 request" in text



@pytest.mark.slow
def test_batching_sweep_quick(repo, tmp_path, capsys):
    # benchmarks/batching_sweep.py serves every dynamic-batching candidate with a real server and measures it
    # with perf_analyzer; the quick mode: delays 0 and 100 µs (the shipped default among them), concurrency 1, 4.
    import csv

    spec = importlib.util.spec_from_file_location("batching_sweep", ROOT / "benchmarks" / "batching_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep.csv"
    assert sweep.main(["--model-repository", str(repo), "--model", TOY_MODEL, "--quick", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted((int(r["delay_us"]), int(r["concurrency"])) for r in rows) == \
        sorted((d, c) for d in (0, 100) for c in (1, 4))
    assert all(float(r["infer_per_s"]) > 0 and float(r["p50_ms"]) > 0 and float(r["server_failed"]) == 0 for r in rows)
    text = capsys.readouterr().out
    assert "chosen: max_queue_delay_microseconds" in text and f"wrote {out}" in text
