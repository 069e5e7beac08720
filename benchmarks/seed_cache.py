"""Seed model and Triton's response cache on the real local server: a repeated seed against a never-seen one.

The shipped checkpoint is exported with ``--seed-model`` into a scratch repository and served by ``kaem-serve``'s
flags (which include ``--cache-config``). On one open gRPC channel, ``--n`` single-image requests for seeds
never asked before (cache misses: the graph runs) are timed, then the same seeds again (hits), interleaved in
rounds so that machine noise hits both alike. Printed: p50/p90 of each, the ratio hit p50 / miss p50 (target
<= 0.5), the cache counters from the metrics endpoint, and the request size per image of the two input kinds.

    python benchmarks/seed_cache.py [--checkpoint checkpoints/kaem_fmnist.pt] [--n 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ms(client, model: str, inputs) -> float:
    t0 = time.perf_counter()
    client.infer(model, inputs)
    return 1000 * (time.perf_counter() - t0)


def _quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[round(q * 100) - 1] if len(xs) > 1 else xs[0]


def main() -> int:
    sys.path.insert(0, str(ROOT))  # benchmarks/serving.py would shadow the serving package
    import tritonclient.grpc as grpcclient

    from export.contract import INPUT_U, SEED_MODEL_SUFFIX, request_rows
    from export.to_onnx import export_checkpoint
    from serving.client import infer_inputs
    from serving.local.launcher import LocalTriton, free_ports
    from serving.metrics import fetch_metrics_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "kaem_fmnist.pt"))
    p.add_argument("--n", type=int, default=200, help="distinct seeds per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds of n misses then the same n as hits")
    args = p.parse_args()
    if args.n < 2 or args.rounds < 1:
        p.error("--n must be >= 2 and --rounds >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        report = export_checkpoint(args.checkpoint, repo, "kaem", max_batch_size=16, seed_model=True)
        model = "kaem" + SEED_MODEL_SUFFIX
        contract = report.contract
        miss, hit = [], []
        grpc, http, metrics = free_ports(3)
        with LocalTriton(repo, grpc_port=grpc, http_port=http, metrics_port=metrics,
                         log_file=Path(tmp) / "tritonserver.log") as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            seed_contract = dataclasses.replace(contract, inputs="seed")
            for r in range(args.rounds):
                seeds = range(10_000 * (r + 1), 10_000 * (r + 1) + args.n)  # never asked before
                inputs = [infer_inputs(request_rows([s], seed_contract)) for s in seeds]
                miss += [_ms(client, model, x) for x in inputs]
                hit += [_ms(client, model, x) for x in inputs]
            text = fetch_metrics_text(server.metrics_url)
            client.close()

    def counter(name: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(name + "{") and f'model="{model}"' in ln)

    u_bytes = 4 * contract.u_dim
    seed_bytes = 8 + 4
    print(f"{model}: {len(miss)} never-seen seeds vs the same seeds again, batch 1, one gRPC channel")
    print(f"  miss  p50 {statistics.median(miss):.3f} ms  p90 {_quantile(miss, 0.9):.3f} ms")
    print(f"  hit   p50 {statistics.median(hit):.3f} ms  p90 {_quantile(hit, 0.9):.3f} ms")
    print(f"  hit p50 / miss p50: {statistics.median(hit) / statistics.median(miss):.2f}x (target <= 0.5)")
    print(f"  server cache counters: hits {counter('nv_cache_num_hits_per_model'):.0f}, "
          f"misses {counter('nv_cache_num_misses_per_model'):.0f}")
    print(f"  request tensors per image: {INPUT_U} model {u_bytes} bytes (FP32 x {contract.u_dim}), "
          f"seed model {seed_bytes} bytes (INT64 seed + FP32 truncation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
