"""Overload benchmark: the real local Triton, with a bounded queue (``default_queue_policy``, REJECT) when asked,
under closed-loop load from the project's async gRPC client, below, at and past saturation.

1. Sweep: C requests in flight for --seconds each (C = 1, 2, 4, ... up to --max-concurrency). The saturating
   concurrency is the smallest C whose accepted requests/s reach 95 % of the sweep's maximum.
2. Overload: 4x the saturating concurrency for --overload-seconds; then the server process must still run and
   answer /v2/health/ready and a request.

Every request's status and client latency (send to answer) is recorded: accepted, rejected because the queue was
full ("Exceeds maximum queue size"), rejected after waiting out the queue timeout ("Request timeout expired"), or
another error. A worker whose request was rejected waits kaem-generate's backoff before it sends the next one
(serving.client.RetryPolicy, growing with consecutive rejections), as a fleet of retrying clients would;
--no-backoff sends at once. The targets of the overload-control issue are printed next to the measured values.
Absolute numbers are machine-specific; the server and this client share the CPU here.

    python benchmarks/overload.py [--checkpoint checkpoints/kaem_fmnist.pt | --model-repository DIR --model NAME]
                                  [--max-queue-size N] [--queue-timeout-ms T] [--quick]

By default the checkpoint is exported (the production export and config) into a temporary repository; the rendered
config has no queue policy (export/triton_config.py says why), so --max-queue-size / --queue-timeout-ms serve a
copy with one, and --no-queue-policy removes one from a --model-repository that has it. Measured here: with any
default_queue_policy, Triton 2.51's dynamic batcher now and then leaves a request queued for 500 ms (its idle wait)
although the model is free; the "acc max ms" column shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# run as a script: the project's packages first, not this folder's serving.py (it would shadow `serving`)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from export.contract import DEFAULT_MODEL_NAME, OUTPUT_IMAGES
from export.triton_config import parse_config, write_config
from serving.client import (
    RetryPolicy,
    ServingError,
    connect,
    generate_images,
    infer_inputs,
    rejection_kind,
    status_name,
    u_for_contract,
)
from serving.local.launcher import LocalTriton, free_ports
from serving.metrics import delta, read_settled
from training.cli import HelpFormatter

ACCEPTED, QUEUE_FULL, QUEUE_TIMEOUT = "ok", "queue_full", "queue_timeout"
SATURATION_SHARE = 0.95  # the rule: smallest concurrency with >= 95 % of the sweep's best throughput
OVERLOAD_FACTOR = 4
WORKERS_PER_CHANNEL = 32  # workers sharing one gRPC channel (one HTTP/2 connection)
MAX_BACKOFF_STEP = 16  # consecutive rejections beyond this draw from the capped range anyway


@dataclass
class Level:
    """One load level: ``records`` are (status, client latency in s) of the requests answered in the measured
    window, ``totals`` the answers per status over the whole run (warm-up included)."""

    concurrency: int
    seconds: float
    records: list[tuple[str, float]]
    totals: dict[str, int]

    def latencies(self, status: str) -> np.ndarray:
        return np.array([s for k, s in self.records if k == status])

    def count(self, status: str) -> int:
        return sum(1 for k, _ in self.records if k == status)

    @property
    def accepted_per_s(self) -> float:
        return self.count(ACCEPTED) / self.seconds

    def others(self) -> dict[str, int]:
        kinds = {k for k, _ in self.records} - {ACCEPTED, QUEUE_FULL, QUEUE_TIMEOUT}
        return {k: self.count(k) for k in sorted(kinds)}


def _ms(values: np.ndarray, q: float) -> float:
    return 1000 * float(np.quantile(values, q)) if len(values) else float("nan")


def _cell(value: float, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if np.isnan(value) else f"{value:>{width}.{digits}f}"


async def _worker(client: aioclient.InferenceServerClient, model: str, inputs: list, window: tuple[float, float],
                  out: list, totals: Counter, backoff: RetryPolicy | None, rng: random.Random,
                  timeout_s: float) -> None:
    """Send requests back to back until ``window`` ends; record those answered inside it."""
    outputs, streak = [grpcclient.InferRequestedOutput(OUTPUT_IMAGES)], 0
    while time.perf_counter() < window[1]:
        t0 = time.perf_counter()
        try:
            await client.infer(model, inputs, outputs=outputs, client_timeout=timeout_s)
            status = ACCEPTED
        except InferenceServerException as err:
            status = rejection_kind(err) or status_name(err)
        t1 = time.perf_counter()
        totals[status] += 1
        if window[0] <= t1 <= window[1]:
            out.append((status, t1 - t0))
        if status in (QUEUE_FULL, QUEUE_TIMEOUT) and backoff is not None:
            await asyncio.sleep(backoff.backoff_s(min(streak, MAX_BACKOFF_STEP), rng))
            streak += 1
        else:
            streak = 0


async def _run_level(url: str, model: str, u: np.ndarray, concurrency: int, seconds: float, warmup_s: float,
                     backoff: RetryPolicy | None, seed: int, timeout_s: float) -> Level:
    n_channels = -(-concurrency // WORKERS_PER_CHANNEL)
    clients = [aioclient.InferenceServerClient(url) for _ in range(n_channels)]
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + seconds)
    records: list[tuple[str, float]] = []
    totals: Counter = Counter()
    batch = len(u) // concurrency
    try:
        await asyncio.gather(*(
            _worker(clients[i % n_channels], model, infer_inputs(u[i * batch : (i + 1) * batch]), window, records,
                    totals, backoff, random.Random(seed * 100_003 + i), timeout_s)
            for i in range(concurrency)))
    finally:
        for c in clients:
            await c.close()
    return Level(concurrency, seconds, records, dict(totals))


def run_level(url: str, model: str, contract, concurrency: int, batch_size: int, seconds: float, warmup_s: float,
              backoff: RetryPolicy | None, seed: int = 0, timeout_s: float = 30.0) -> Level:
    """``concurrency`` closed-loop workers, each sending ``batch_size`` rows of its own seeds, answers counted in
    the ``seconds`` after ``warmup_s``; ``backoff``: how long a rejected worker waits (None: not at all)."""
    u = u_for_contract(range(concurrency * batch_size), contract)
    return asyncio.run(_run_level(url, model, u, concurrency, seconds, warmup_s, backoff, seed, timeout_s))


def saturating(levels: list[Level]) -> Level:
    """The smallest concurrency whose throughput is >= SATURATION_SHARE of the sweep's maximum."""
    best = max(lv.accepted_per_s for lv in levels)
    return min((lv for lv in levels if lv.accepted_per_s >= SATURATION_SHARE * best), key=lambda lv: lv.concurrency)


HEADER = (f"{'concurrency':>11} {'accepted/s':>10} {'images/s':>9} {'acc p50 ms':>10} {'acc p99 ms':>10}"
          f" {'acc max ms':>10} {'queue-full':>10} {'qf p99 ms':>9} {'timeouts':>8} {'to p50 ms':>9} {'others':>6}")


def format_row(lv: Level, batch_size: int, label: str = "") -> str:
    ok, qf, to = lv.latencies(ACCEPTED), lv.latencies(QUEUE_FULL), lv.latencies(QUEUE_TIMEOUT)
    others = ",".join(f"{k}={n}" for k, n in lv.others().items()) or "0"
    return (f"{lv.concurrency:>11} {lv.accepted_per_s:>10,.0f} {lv.accepted_per_s * batch_size:>9,.0f}"
            f" {_cell(_ms(ok, 0.5), 10)} {_cell(_ms(ok, 0.99), 10)} {_cell(_ms(ok, 1.0), 10, 1)} {len(qf):>10}"
            f" {_cell(_ms(qf, 0.99), 9)} {len(to):>8} {_cell(_ms(to, 0.5), 9)} {others:>6}{label}")


def queue_policy(grpc_url: str, model: str) -> tuple[int, int, str] | None:
    """(max_queue_size, default_timeout_microseconds, timeout action) of the served model's config, None when it
    has no queue policy."""
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        batching = client.get_model_config(model).config.dynamic_batching
    finally:
        client.close()
    if not batching.HasField("default_queue_policy"):
        return None
    policy = batching.default_queue_policy
    return (policy.max_queue_size, policy.default_timeout_microseconds,
            model_config_pb2.ModelQueuePolicy.TimeoutAction.Name(policy.timeout_action))


def server_health(server: LocalTriton, model: str) -> tuple[bool, bool, bool]:
    """(process alive, /v2/health/ready answers 200, one request served) after the overload."""
    alive = server.running
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as resp:
            ready = resp.status == 200
    except OSError:
        ready = False
    try:
        served = generate_images(server.grpc_url, model, [0])[0].shape[0] == 1
    except ServingError:
        served = False
    return alive, ready, served


def targets(sat: Level, over: Level, timeout_us: int, rejected_by_server: float, health: tuple[bool, bool, bool],
            ) -> list[str]:
    """The issue's targets next to the measured values, one line each."""
    alive, ready, served = health
    ok_ratio = _ms(over.latencies(ACCEPTED), 0.99) / _ms(sat.latencies(ACCEPTED), 0.99)
    qf, to = over.latencies(QUEUE_FULL), over.latencies(QUEUE_TIMEOUT)
    crashes = 0 if alive else 1
    lines = [
        f"  server crashes: {crashes} (process {'alive' if alive else 'DEAD'}, /v2/health/ready "
        f"{'200' if ready else 'not ready'}, a request afterwards {'served' if served else 'FAILED'})"
        "   target: 0, ready afterwards",
        f"  queue-full rejections: {len(qf)}, client p99 {_cell(_ms(qf, 0.99), 0)} ms   target: p99 < 10 ms",
    ]
    if timeout_us and len(to):
        ratio = _ms(to, 0.5) / (timeout_us / 1000)
        lines.append(f"  queue-timeout rejections: {len(to)}, client p50 {_ms(to, 0.5):.1f} ms, p1-p99 "
                     f"{_ms(to, 0.01):.1f}-{_ms(to, 0.99):.1f} ms = {ratio:.2f}x the configured "
                     f"{timeout_us / 1000:g} ms   target: 0.80-1.20x")
    else:
        why = "no queue timeout configured" if not timeout_us else "no request waited that long"
        lines.append(f"  queue-timeout rejections: 0 ({why}; configured {timeout_us / 1000:g} ms)"
                     "   target: at the configured timeout +- 20 %")
    lines += [
        f"  accepted p99 at {over.concurrency} / at {sat.concurrency} = {ok_ratio:.2f}x   target: <= 1.5x",
        f"  the server counted {rejected_by_server:.0f} REJECTED failures, the client saw"
        f" {over.totals.get(QUEUE_TIMEOUT, 0)} queue-timeout and {over.totals.get(QUEUE_FULL, 0)} queue-full"
        " rejections in the whole run (Triton 2.51 counts only the queue timeouts)",
    ]
    return lines


def prepare_repository(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The repository to serve and the model name: the toy model (--quick without a repository), a copy of
    --model-repository, or the checkpoint exported into ``tmp``; with a changed queue policy when asked."""
    changed = args.max_queue_size is not None or args.queue_timeout_ms is not None or not args.queue_policy
    if args.model_repository:
        repo, model = Path(args.model_repository), args.model or DEFAULT_MODEL_NAME
        if changed:
            shutil.copytree(repo / model, tmp / "repo" / model)
            repo = tmp / "repo"
    elif args.quick:
        from export.toy_model import TOY_MODEL, build_toy_repository  # torch: only where a model is built

        repo, model = build_toy_repository(tmp), args.model or TOY_MODEL
    else:
        from export.to_onnx import export_checkpoint

        model = args.model or DEFAULT_MODEL_NAME
        report = export_checkpoint(args.checkpoint, tmp / "repo", model)
        repo = tmp / "repo"
        print(f"exported {args.checkpoint} to {report.path} (parity vs eager: {report.max_pixel_diff} grey levels)")
    if changed:
        set_queue_policy(repo / model, args.max_queue_size, args.queue_timeout_ms, args.queue_policy)
    return repo, model


def set_queue_policy(model_dir: Path, max_queue_size: int | None, timeout_ms: float | None, keep: bool = True,
                     ) -> None:
    """Change the queue policy of ``model_dir``'s config in place (every other field kept); ``keep=False``
    removes it."""
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    if not keep:
        cfg.dynamic_batching.ClearField("default_queue_policy")
    policy = cfg.dynamic_batching.default_queue_policy
    if max_queue_size is not None:
        policy.max_queue_size = max_queue_size
    if timeout_ms is not None:
        policy.default_timeout_microseconds = round(1000 * timeout_ms)
    write_config(model_dir, text_format.MessageToString(cfg))


class _Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Real defaults shown, the module docstring kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/overload.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=_Help)
    p.add_argument("--checkpoint", default="checkpoints/kaem_fmnist.pt",
                   help="checkpoint to export and serve (ignored with --model-repository or --quick)")
    p.add_argument("--model-repository", default=None,
                   help="serve this exported repository instead (e.g. model_repository after make demo)")
    p.add_argument("--model", default=None, help="model name (default: kaem_fmnist, or the toy model with --quick)")
    p.add_argument("--max-queue-size", type=int, default=None,
                   help="serve with this max_queue_size instead of the config's (0: unbounded)")
    p.add_argument("--queue-timeout-ms", type=float, default=None,
                   help="serve with this queue timeout instead of the config's (0: none)")
    p.add_argument("--queue-policy", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-queue-policy serves the config without its default_queue_policy (to compare)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request (batch-1 requests: the batcher's case)")
    p.add_argument("--max-concurrency", type=int, default=64, help="largest concurrency of the sweep (powers of 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per sweep level")
    p.add_argument("--overload-seconds", type=float, default=10.0, help="measured seconds at 4x saturation")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each measured window")
    p.add_argument("--backoff", action=argparse.BooleanOptionalAction, default=True,
                   help="after a rejection a worker waits kaem-generate's retry backoff before its next request")
    p.add_argument("--quick", action="store_true",
                   help="smoke run for tests: concurrency 1-4, 0.5 s per level, 1 s overload, on the toy model"
                        " (export/toy_model.py) unless --model-repository is given")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.max_concurrency, args.seconds, args.overload_seconds, args.warmup = 4, 0.5, 1.0, 0.2
    if args.max_concurrency < 1 or args.batch_size < 1 or args.seconds <= 0 or args.overload_seconds <= 0:
        raise SystemExit("benchmark: --max-concurrency and --batch-size must be >= 1, --seconds > 0")
    backoff = RetryPolicy() if args.backoff else None
    sweep = [2**k for k in range(args.max_concurrency.bit_length()) if 2**k <= args.max_concurrency]
    with tempfile.TemporaryDirectory() as tmp:
        repo, model = prepare_repository(args, Path(tmp))
        grpc_port, http_port, metrics_port = free_ports(3)
        with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                         log_file=Path(tmp) / "tritonserver.log") as server:
            client, served = connect(server.grpc_url, model)
            client.close()
            policy = queue_policy(server.grpc_url, model)
            size, timeout_us, action = policy or (0, 0, "")
            described = (f"queue policy max_queue_size {size or 'unbounded'}, timeout {timeout_us / 1000:g} ms,"
                         f" {action}" if policy else "no queue policy")
            print(f"overload benchmark, model {model}: max_batch_size {served.max_batch_size}, {described}; "
                  f"{args.batch_size}-row requests, {'backoff' if backoff else 'no backoff'} after a rejection")
            print(HEADER)
            levels = []
            for c in sweep:
                levels.append(run_level(server.grpc_url, model, served.contract, c, args.batch_size, args.seconds,
                                        args.warmup, backoff, seed=c))
                print(format_row(levels[-1], args.batch_size), flush=True)
            sat = saturating(levels)
            best = max(levels, key=lambda lv: lv.accepted_per_s)
            print(f"saturating concurrency: {sat.concurrency} ({sat.accepted_per_s:,.0f} accepted/s = "
                  f"{100 * sat.accepted_per_s / best.accepted_per_s:.0f} % of the sweep's maximum "
                  f"{best.accepted_per_s:,.0f} at {best.concurrency})")
            before = read_settled(server.metrics_url, model)
            over = run_level(server.grpc_url, model, served.contract, OVERLOAD_FACTOR * sat.concurrency,
                             args.batch_size, args.overload_seconds, args.warmup, backoff, seed=0)
            window = delta(read_settled(server.metrics_url, model), before)[model]
            rejected = sum(v["failures"].get("REJECTED", 0.0) for v in window.values())
            print(format_row(over, args.batch_size, f"  <- {OVERLOAD_FACTOR}x saturating, {args.overload_seconds:g} s"))
            health = server_health(server, model)
    print(f"targets at {OVERLOAD_FACTOR}x the saturating concurrency (measured | target):")
    print("\n".join(targets(sat, over, timeout_us, rejected, health)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
