"""Serving client pieces that need no server: seed and option parsing, the contract check, the
onnxruntime shim's merge/split, metrics parsing on a captured real Triton 2.51 scrape, perf data,
and every CLI's --help."""
# ruff: noqa: E501  (the captured scrape at the end keeps Triton's long HELP lines verbatim)

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, Histogram

from export.contract import INPUT_U, OUTPUT_IMAGES, OUTPUT_MEAN, ContractError
from export.toy_model import TOY_CONTRACT, build_toy_repository, wrong_contract_config
from export.triton_config import contract_from_config, parse_config
from serving import client, metrics
from serving.loadtest import LoadTestError, parse_concurrency, process_tree_cpu_s
from serving.local.ort_shim import check_input, run_merged
from serving.perf_data import perf_input_data
from training.uniforms import uniforms_for_seeds

CLIS = {"kaem-serve": "serving.local.launcher", "kaem-generate": "serving.client", "kaem-metrics": "serving.metrics",
        "kaem-loadtest": "serving.loadtest"}


@pytest.mark.parametrize("seeds, message", [("5-3", "end is smaller"), ("a-b", "bad seed range"),
                                            ("-4", "bad seed range"), ("", "bad seed range")])
def test_bad_seed_ranges_exit_with_a_message(seeds, message, capsys):
    assert client.main(["--seeds", seeds, "--url", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_unreachable_server_is_a_clear_error(capsys):
    assert client.main(["--seeds", "0-3", "--url", "127.0.0.1:1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "no Triton server reachable at 127.0.0.1:1" in err and "Traceback" not in err


def test_contract_mismatch_is_refused():
    with pytest.raises(ContractError, match="re-export the model"):
        contract_from_config(parse_config(wrong_contract_config("kaem_toy")))


def test_truncation_touches_only_the_its_uniforms():
    seeds = list(range(50))
    u = client.u_for_contract(seeds, TOY_CONTRACT, truncation=0.25)
    raw = uniforms_for_seeds(seeds, TOY_CONTRACT.u_dim)
    s = TOY_CONTRACT.its_start
    assert s > 0 and np.array_equal(u[:, :s], raw[:, :s])
    np.testing.assert_allclose(u[:, s:], 0.5 + 0.25 * (raw[:, s:] - 0.5), atol=1e-7)
    assert np.array_equal(client.u_for_contract(seeds, TOY_CONTRACT), raw)


def test_client_histogram_quantiles_are_estimated_from_buckets():
    registry = CollectorRegistry()
    hist = Histogram("t_seconds", "test", buckets=client.LATENCY_BUCKETS, registry=registry)
    values = np.random.default_rng(0).uniform(0.001, 0.009, size=2000)
    for v in values:
        hist.observe(v)
    stats = client.GenerationStats(2000, 2000, 1.0, registry, hist)
    edges = (0.0, *client.LATENCY_BUCKETS)
    for q in (0.5, 0.9, 0.99):
        true = float(np.quantile(values, q))
        k = int(np.searchsorted(edges, true))  # the true quantile lies in (edges[k-1], edges[k]]
        assert edges[k - 1] <= stats.latency_quantile(q) <= edges[k]
    assert math.isnan(metrics.histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert metrics.histogram_quantile(0.5, [(1.0, 0.0), (2.0, 10.0), (math.inf, 10.0)]) == pytest.approx(1.5)


def test_shim_merges_requests_and_splits_outputs(tmp_path):
    onnx_path = build_toy_repository(tmp_path) / "kaem_toy" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    parts = [uniforms_for_seeds(range(k, k + n), TOY_CONTRACT.u_dim) for k, n in ((0, 1), (10, 5), (20, 3))]
    merged = run_merged(sess, [{INPUT_U: p} for p in parts], [OUTPUT_IMAGES, OUTPUT_MEAN])
    for p, out in zip(parts, merged, strict=True):
        alone = sess.run([OUTPUT_IMAGES], {INPUT_U: p})[0]
        assert out[OUTPUT_IMAGES].shape == (len(p), 12, 12, 1) and np.array_equal(out[OUTPUT_IMAGES], alone)
        assert out[OUTPUT_MEAN].dtype == np.float32 and out[OUTPUT_MEAN].flags.c_contiguous


@pytest.mark.parametrize("array, message", [
    (None, "is missing"), (np.zeros((2, 8), np.float64), "must be float32"),
    (np.zeros((2, 7), np.float32), r"shape \[batch, 8\], got \[2, 7\]"), (np.zeros(8, np.float32), "shape"),
    (np.zeros((0, 8), np.float32), "empty batch")])
def test_shim_rejects_bad_inputs_with_a_message(array, message):
    err = check_input("u", array, np.float32, [8])
    assert err is not None and re.search(message, err)
    assert check_input("u", np.zeros((3, 8), np.float32), np.float32, [8]) is None


def test_metrics_parsing_on_a_captured_real_scrape():
    text = CAPTURED_METRICS.replace('reason="BACKEND",version="1"} 0', 'reason="BACKEND",version="1"} 3')
    stats = metrics.parse_metrics(text)
    s = stats["kaem_toy"]["1"]
    assert (s["success"], s["failed"], s["requests"]) == (40, 3, 43)
    assert s["failures"] == {"OTHER": 0, "BACKEND": 3, "CANCELED": 0, "REJECTED": 0}
    assert (s["p50_us"], s["p90_us"], s["p99_us"]) == (1141, 53356, 61744)
    assert s["avg_batch_size"] == pytest.approx(40 / 15)
    assert s["avg_queue_us"] == pytest.approx(408824 / 40)
    assert s["avg_compute_us"] == pytest.approx((1835 + 84116 + 8284) / 40)
    assert metrics.parse_metrics(text, model="other") == {}
    report = metrics.format_report(stats)
    assert "kaem_toy" in report and "BACKEND=3" in report and "2.67" in report
    exec_line = 'nv_inference_exec_count{model="kaem_toy",version="1"} '
    later = metrics.parse_metrics(text.replace("} 40\n", "} 50\n").replace(exec_line + "15", exec_line + "20"))
    d = metrics.delta(later, stats)["kaem_toy"]["1"]
    assert d["success"] == 10 and d["inference_count"] == 10 and d["avg_batch_size"] == pytest.approx(2.0)


def test_metrics_cli_reports_an_unreachable_endpoint(capsys):
    assert metrics.main(["--url", "127.0.0.1:1", "--timeout", "1"]) == 2
    assert "cannot read Triton metrics at http://127.0.0.1:1/metrics" in capsys.readouterr().err


_BURN = """
import os, subprocess, sys, time
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[2]], stdout=subprocess.PIPE)
    child.stdout.readline()
while time.process_time() < 0.4:  # 0.4 s of CPU, however busy the machine is
    pass
print("ready", flush=True)
time.sleep(60)
"""


def test_process_tree_cpu_counts_a_process_and_its_descendants():
    # kaem-loadtest's server CPU per inference: tritonserver plus the backend stubs it starts
    proc = subprocess.Popen([sys.executable, "-c", _BURN, "parent", _BURN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: both go at the end
    try:
        assert proc.stdout.readline().strip() == "ready"  # the child finished its 0.4 s first
        used = process_tree_cpu_s(proc.pid)
        assert used is not None and 0.75 <= used < 5.0, used  # parent and child, 0.4 s each
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert process_tree_cpu_s(proc.pid) is None  # a reaped process


def test_perf_input_data_holds_valid_float_uniforms():
    data = perf_input_data(TOY_CONTRACT, n=5, first_seed=3)
    text = json.dumps(data)
    entries = data["data"]
    assert len(entries) == 5 and all(e[INPUT_U]["shape"] == [TOY_CONTRACT.u_dim] for e in entries)
    content = np.array([e[INPUT_U]["content"] for e in entries], dtype=np.float32)
    assert np.array_equal(content, uniforms_for_seeds(range(3, 8), TOY_CONTRACT.u_dim))
    assert ((content > 0) & (content < 1)).all()
    numbers = json.loads(text, parse_float=lambda s: ("float", s), parse_int=lambda s: ("int", s))
    assert {kind for e in numbers["data"] for kind, _ in e[INPUT_U]["content"]} == {"float"}


def test_perf_input_data_for_a_seed_model_holds_seeds_and_truncation():
    seed = dataclasses.replace(TOY_CONTRACT, inputs="seed")
    data = perf_input_data(seed, n=3, first_seed=7, truncation=0.5)
    assert data["data"] == [{"seed": {"content": [s], "shape": [1]}, "truncation": {"content": [0.5], "shape": [1]}}
                            for s in (7, 8, 9)]


def test_metrics_report_shows_response_cache_hits_per_model():
    text = ('nv_cache_num_hits_per_model{model="kaem_seed",version="1"} 12\n'
            'nv_cache_num_misses_per_model{model="kaem_seed",version="1"} 30\n'
            'nv_inference_request_success{model="kaem_seed",version="1"} 42\n'
            'nv_inference_request_success{model="kaem",version="1"} 5\n')
    stats = metrics.parse_metrics(text)
    assert stats["kaem_seed"]["1"]["cache_hits"] == 12 and stats["kaem"]["1"]["cache_hits"] == 0
    report = metrics.format_report(stats)
    assert "response cache: 12 hits, 30 misses" in report and report.count("response cache") == 1


def test_concurrency_specs():
    assert parse_concurrency("1:16:x2") == [1, 2, 4, 8, 16]
    assert parse_concurrency("1:7:3") == [1, 4, 7]
    assert parse_concurrency("2,8") == [2, 8]
    for bad in ("0,1", "a", "4:1", "1:8:x1"):
        with pytest.raises(LoadTestError, match="bad --concurrency"):
            parse_concurrency(bad)


@pytest.mark.parametrize("name", sorted(CLIS))
def test_cli_help(name):
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get(name) == f"{CLIS[name]}:main"
    done = subprocess.run([sys.executable, "-m", CLIS[name], "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {name}") and "(default:" in done.stdout


# A real scrape of the local Triton 2.51 server (toy model, 40 batch-1 requests at concurrency 8).
CAPTURED_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="kaem_toy",version="1"} 40
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="kaem_toy",reason="OTHER",version="1"} 0
nv_inference_request_failure{model="kaem_toy",reason="BACKEND",version="1"} 0
nv_inference_request_failure{model="kaem_toy",reason="CANCELED",version="1"} 0
nv_inference_request_failure{model="kaem_toy",reason="REJECTED",version="1"} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="kaem_toy",version="1"} 40
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="kaem_toy",version="1"} 15
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds (includes cached requests)
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="kaem_toy",version="1"} 503306
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="kaem_toy",version="1"} 408824
# HELP nv_inference_compute_input_duration_us Cumulative compute input duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="kaem_toy",version="1"} 1835
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="kaem_toy",version="1"} 84116
# HELP nv_inference_compute_output_duration_us Cumulative inference compute output duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="kaem_toy",version="1"} 8284
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="kaem_toy",version="1"} 0
# HELP nv_pinned_memory_pool_total_bytes Pinned memory pool total memory size, in bytes
# TYPE nv_pinned_memory_pool_total_bytes gauge
nv_pinned_memory_pool_total_bytes 0
# HELP nv_pinned_memory_pool_used_bytes Pinned memory pool used memory size, in bytes
# TYPE nv_pinned_memory_pool_used_bytes gauge
nv_pinned_memory_pool_used_bytes 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0
# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes
# TYPE nv_cpu_memory_total_bytes gauge
nv_cpu_memory_total_bytes 0
# HELP nv_cpu_memory_used_bytes CPU used memory (RAM), in bytes
# TYPE nv_cpu_memory_used_bytes gauge
nv_cpu_memory_used_bytes 0
# HELP nv_inference_request_summary_us Summary of inference request duration in microseconds (includes cached requests)
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{model="kaem_toy",version="1"} 40
nv_inference_request_summary_us_sum{model="kaem_toy",version="1"} 503306
nv_inference_request_summary_us{model="kaem_toy",version="1",quantile="0.5"} 1141
nv_inference_request_summary_us{model="kaem_toy",version="1",quantile="0.9"} 53356
nv_inference_request_summary_us{model="kaem_toy",version="1",quantile="0.99"} 61744
# HELP nv_inference_queue_summary_us Summary of inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_summary_us summary
nv_inference_queue_summary_us_count{model="kaem_toy",version="1"} 40
nv_inference_queue_summary_us_sum{model="kaem_toy",version="1"} 408824
nv_inference_queue_summary_us{model="kaem_toy",version="1",quantile="0.5"} 576
nv_inference_queue_summary_us{model="kaem_toy",version="1",quantile="0.9"} 52532
nv_inference_queue_summary_us{model="kaem_toy",version="1",quantile="0.99"} 60636
# HELP nv_inference_compute_input_summary_us Cumulative compute input duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_input_summary_us summary
nv_inference_compute_input_summary_us_count{model="kaem_toy",version="1"} 40
nv_inference_compute_input_summary_us_sum{model="kaem_toy",version="1"} 1835
nv_inference_compute_input_summary_us{model="kaem_toy",version="1",quantile="0.5"} 45
nv_inference_compute_input_summary_us{model="kaem_toy",version="1",quantile="0.9"} 62
nv_inference_compute_input_summary_us{model="kaem_toy",version="1",quantile="0.99"} 62
# HELP nv_inference_compute_infer_summary_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_summary_us summary
nv_inference_compute_infer_summary_us_count{model="kaem_toy",version="1"} 40
nv_inference_compute_infer_summary_us_sum{model="kaem_toy",version="1"} 84116
nv_inference_compute_infer_summary_us{model="kaem_toy",version="1",quantile="0.5"} 395
nv_inference_compute_infer_summary_us{model="kaem_toy",version="1",quantile="0.9"} 546
nv_inference_compute_infer_summary_us{model="kaem_toy",version="1",quantile="0.99"} 790
# HELP nv_inference_compute_output_summary_us Cumulative inference compute output duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_output_summary_us summary
nv_inference_compute_output_summary_us_count{model="kaem_toy",version="1"} 40
nv_inference_compute_output_summary_us_sum{model="kaem_toy",version="1"} 8284
nv_inference_compute_output_summary_us{model="kaem_toy",version="1",quantile="0.5"} 129
nv_inference_compute_output_summary_us{model="kaem_toy",version="1",quantile="0.9"} 229
nv_inference_compute_output_summary_us{model="kaem_toy",version="1",quantile="0.99"} 229
"""
