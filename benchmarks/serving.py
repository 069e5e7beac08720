"""Serving benchmark, one run, side by side: local Triton over gRPC vs in-process onnxruntime at
batch 64 (the cost of the serving stack), and batch-1 requests at concurrency 16 vs 1 (the gain of
dynamic batching). Ratios are the result; absolute numbers are machine-specific.

Triton overhead per batch-64 request = Triton ms − in-process onnxruntime ms per call, the in-process
session built from the model's own ``config.pbtxt`` exactly as the server's backend builds it
(serving.local.ort_shim.session_options), in --reps interleaved repetitions (median per call in each; the
median of the repetitions and their min-max are printed).

    python benchmarks/serving.py [--model-repository model_repository --model kaem_fmnist] [--quick]

Without ``--model-repository`` a toy repository (export/toy_model.py) is built on the fly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.triton_config import version_dirs

ROOT = Path(__file__).resolve().parent.parent


def latest_onnx(repo: Path, model: str) -> Path:
    versions = version_dirs(repo / model)
    if not versions:
        raise SystemExit(f"benchmark: no {repo / model}/<version>/model.onnx: export the model first")
    return versions[-1] / "model.onnx"


def bench_onnxruntime(onnx_path: Path, u: np.ndarray, batch: int) -> float:
    """Images/s of in-process onnxruntime (CPU) on ``u`` in batches of ``batch`` (images output only)."""
    import onnxruntime as ort

    from export.contract import INPUT_U, OUTPUT_IMAGES

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sess.run([OUTPUT_IMAGES], {INPUT_U: u[:batch]})  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(u), batch):
        sess.run([OUTPUT_IMAGES], {INPUT_U: u[i : i + batch]})
    return len(u) / (time.perf_counter() - t0)


def config_session(onnx_path: Path, config_path: Path):  # -> onnxruntime.InferenceSession
    """An in-process session with the options the served model gets from its config.pbtxt."""
    import onnxruntime as ort
    from google.protobuf import json_format

    from export.triton_config import parse_config
    from serving.local.ort_shim import session_options

    cfg = json_format.MessageToDict(parse_config(config_path.read_text()), preserving_proto_field_name=True)
    return ort.InferenceSession(str(onnx_path), session_options(cfg), providers=["CPUExecutionProvider"])


def _median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def triton_overhead(grpc_url: str, model: str, onnx_path: Path, config_path: Path, u: np.ndarray, reps: int,
                    calls: int) -> dict:
    """Per batch-64 request: Triton ms − in-process onnxruntime ms (identical session options), ``reps``
    interleaved repetitions of ``calls`` calls each."""
    from export.contract import INPUT_U, OUTPUT_IMAGES
    from serving.client import _infer, connect

    sess = config_session(onnx_path, config_path)
    client, _ = connect(grpc_url, model)
    sess.run([OUTPUT_IMAGES], {INPUT_U: u})
    _infer(client, model, u, 60.0)
    ort_ms, triton_ms = [], []
    for _ in range(reps):
        ort_ms.append(_median_ms(lambda: sess.run([OUTPUT_IMAGES], {INPUT_U: u}), calls))
        triton_ms.append(_median_ms(lambda: _infer(client, model, u, 60.0), calls))
    client.close()
    over = [t - o for t, o in zip(triton_ms, ort_ms, strict=True)]
    return {"ort_ms": statistics.median(ort_ms), "triton_ms": statistics.median(triton_ms),
            "overhead_ms": statistics.median(over), "overhead_min_ms": min(over), "overhead_max_ms": max(over),
            "reps": reps, "calls": calls}


def run_benchmark(grpc_url: str, metrics_url: str, model: str, onnx_path: Path, quick: bool = False,
                  reps: int = 5) -> dict:
    """Run all measurements against a running server; return images/s, ratios and server batch sizes."""
    from serving.client import connect, generate_images, u_for_contract
    from serving.metrics import delta, read_settled

    n_big, n_small = (4 * 64, 64) if quick else (100 * 64, 2000)
    grpc, served = connect(grpc_url, model)
    grpc.close()
    generate_images(grpc_url, model, list(range(64)), batch_size=64)  # warm-up
    out: dict[str, float] = {}
    out["ort_b64"] = bench_onnxruntime(onnx_path, u_for_contract(range(n_big), served.contract), 64)
    out["triton_b64"] = generate_images(grpc_url, model, list(range(n_big)), batch_size=64)[1].images_per_s
    for c in (1, 16):
        before = read_settled(metrics_url, model)
        _, stats = generate_images(grpc_url, model, list(range(n_small)), batch_size=1, concurrency=c)
        window = next(iter(delta(read_settled(metrics_url, model), before)[model].values()))
        out[f"triton_b1_c{c}"] = stats.images_per_s
        out[f"triton_b1_c{c}_p50_ms"] = 1000 * stats.latency_quantile(0.5)
        out[f"server_batch_c{c}"] = window["avg_batch_size"] or 0.0
    over = triton_overhead(grpc_url, model, onnx_path, onnx_path.parent.parent / "config.pbtxt",
                           u_for_contract(range(64), served.contract), reps, 5 if quick else 40)
    out.update({f"b64_{k}": v for k, v in over.items()})
    out["triton_over_ort_b64"] = out["triton_b64"] / out["ort_b64"]
    out["c16_over_c1_b1"] = out["triton_b1_c16"] / out["triton_b1_c1"]
    return out


def format_results(r: dict, model: str) -> str:
    rows = [
        ("in-process onnxruntime (CPU), batch 64", r["ort_b64"], ""),
        ("Triton gRPC, batch 64, 1 in flight", r["triton_b64"], f"x{r['triton_over_ort_b64']:.2f} of onnxruntime"),
        ("Triton gRPC, batch 1, 1 in flight", r["triton_b1_c1"],
         f"p50 {r['triton_b1_c1_p50_ms']:.2f} ms, server batch {r['server_batch_c1']:.2f}"),
        ("Triton gRPC, batch 1, 16 in flight", r["triton_b1_c16"],
         f"x{r['c16_over_c1_b1']:.2f} of 1 in flight, p50 {r['triton_b1_c16_p50_ms']:.2f} ms,"
         f" server batch {r['server_batch_c16']:.2f}"),
    ]
    lines = [f"serving benchmark, model {model}", f"{'measurement':<42} {'images/s':>10}  ratio / notes"]
    lines += [f"{name:<42} {v:>10,.0f}  {note}" for name, v, note in rows]
    lines.append(f"Triton overhead per batch-64 request: {r['b64_overhead_ms']:.2f} ms (median of {r['b64_reps']} "
                 f"interleaved repetitions, min {r['b64_overhead_min_ms']:.2f}, max {r['b64_overhead_max_ms']:.2f}; "
                 f"Triton {r['b64_triton_ms']:.2f} ms vs in-process onnxruntime {r['b64_ort_ms']:.2f} ms per call, "
                 "the same session options from config.pbtxt)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path[:0] = [str(ROOT)]
    from serving.local.launcher import LocalTriton, free_ports

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default=None, help="repository to serve (default: a toy one built now)")
    p.add_argument("--model", default=None, help="model name (default: kaem_fmnist, or the toy model)")
    p.add_argument("--quick", action="store_true", help="few requests: a smoke run for tests")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the batch-64 overhead measurement")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_repository:
            from export.contract import DEFAULT_MODEL_NAME

            repo, model = Path(args.model_repository), args.model or DEFAULT_MODEL_NAME
        else:
            from export.toy_model import TOY_MODEL, build_toy_repository

            repo, model = build_toy_repository(Path(tmp)), args.model or TOY_MODEL
        onnx_path = latest_onnx(repo, model)
        grpc_port, http_port, metrics_port = free_ports(3)
        with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
            results = run_benchmark(server.grpc_url, server.metrics_url, model, onnx_path, args.quick, args.reps)
    print(format_results(results, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
