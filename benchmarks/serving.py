"""Serving benchmark, one run, side by side: local Triton over gRPC vs in-process onnxruntime at
batch 64 (the cost of the serving stack), and batch-1 requests at concurrency 16 vs 1 (the gain of
dynamic batching). Ratios are the result; absolute numbers are machine-specific.

    python benchmarks/serving.py [--model-repository model_repository --model kaem_fmnist] [--quick]

Without ``--model-repository`` a toy repository (tests/serving_fixtures.py) is built on the fly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def latest_onnx(repo: Path, model: str) -> Path:
    versions = sorted((p for p in (repo / model).iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()),
                      key=lambda p: int(p.name))
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


def run_benchmark(grpc_url: str, metrics_url: str, model: str, onnx_path: Path, quick: bool = False) -> dict:
    """Run all measurements against a running server; return images/s, ratios and server batch sizes."""
    from serving.client import connect, generate_images, seeds_to_u
    from serving.metrics import delta, read_settled

    n_big, n_small = (4 * 64, 64) if quick else (100 * 64, 2000)
    grpc, served = connect(grpc_url, model)
    grpc.close()
    generate_images(grpc_url, model, list(range(64)), batch_size=64)  # warm-up
    out: dict[str, float] = {}
    out["ort_b64"] = bench_onnxruntime(onnx_path, seeds_to_u(range(n_big), served.contract), 64)
    out["triton_b64"] = generate_images(grpc_url, model, list(range(n_big)), batch_size=64)[1].images_per_s
    for c in (1, 16):
        before = read_settled(metrics_url, model)
        _, stats = generate_images(grpc_url, model, list(range(n_small)), batch_size=1, concurrency=c)
        window = next(iter(delta(read_settled(metrics_url, model), before)[model].values()))
        out[f"triton_b1_c{c}"] = stats.images_per_s
        out[f"triton_b1_c{c}_p50_ms"] = 1000 * stats.latency_quantile(0.5)
        out[f"server_batch_c{c}"] = window["avg_batch_size"] or 0.0
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from serving.launcher import LocalTriton, free_ports

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default=None, help="repository to serve (default: a toy one built now)")
    p.add_argument("--model", default=None, help="model name (default: kaem_fmnist, or the toy model)")
    p.add_argument("--quick", action="store_true", help="few requests: a smoke run for tests")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_repository:
            from export.contract import DEFAULT_MODEL_NAME

            repo, model = Path(args.model_repository), args.model or DEFAULT_MODEL_NAME
        else:
            from serving_fixtures import TOY_MODEL, build_toy_repository

            repo, model = build_toy_repository(Path(tmp)), args.model or TOY_MODEL
        onnx_path = latest_onnx(repo, model)
        grpc_port, http_port, metrics_port = free_ports(3)
        with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
            results = run_benchmark(server.grpc_url, server.metrics_url, model, onnx_path, args.quick)
    print(format_results(results, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
