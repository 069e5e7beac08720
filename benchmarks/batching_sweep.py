"""Dynamic-batching sweep: which ``max_queue_delay_microseconds`` and ``preferred_batch_size`` serve the
model best on this machine. For every candidate the model is served by a fresh local Triton (the
model's own graph and config, only ``dynamic_batching`` changed) and perf_analyzer measures batch-1
requests at each concurrency level (serving.loadtest.sweep, the engine behind ``kaem-loadtest``).

    python benchmarks/batching_sweep.py [--model-repository model_repository] [--model kaem_fmnist]
        [--delays 0,100,500,2000] [--preferred 64,128,256 none] [--concurrency 1,16,64]
        [--csv benchmarks/results/batching_sweep.csv] [--quick]

Choice rule, printed with the table: the highest concurrency-64 (the last level's) throughput among
the candidates whose concurrency-1 p50 latency is no worse than the shipped defaults' (measured in the
same run) by more than --p50-tolerance. The CSV holds every row; commit it with the defaults it chose
(export/triton_config.py: DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_PREFERRED_BATCH_SIZES).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["delay_us", "preferred", "concurrency", "infer_per_s", "p50_ms", "p99_ms", "server_avg_batch",
           "server_queue_ms", "server_compute_ms", "server_failed"]


def _preferred(text: str) -> tuple[int, ...]:
    return () if text == "none" else tuple(int(b) for b in text.split(","))


def _label(preferred: tuple[int, ...]) -> str:
    return ",".join(map(str, preferred)) or "none"


def candidate_repository(src_repo: Path, model: str, dst: Path, delay_us: int, preferred: tuple[int, ...]) -> Path:
    """A copy of ``<src_repo>/<model>`` (latest version only) whose config differs only in dynamic_batching."""
    from export.triton_config import parse_config, render_config, version_dirs, write_config
    from serving.perf_data import contract_from_repository

    cfg = parse_config((src_repo / model / "config.pbtxt").read_text())
    session = {k: p.string_value for k, p in cfg.parameters.items() if not k.startswith("kaem.")}
    versions = version_dirs(src_repo / model)
    if not versions:
        raise SystemExit(f"batching_sweep: no {src_repo / model}/<version>/model.onnx: export the model first")
    target = dst / model
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    shutil.copyfile(versions[-1] / "model.onnx", target / "1" / "model.onnx")
    write_config(target, render_config(model, contract_from_repository(src_repo, model), cfg.max_batch_size,
                                       preferred, delay_us, session=session))
    return dst


def measure(repo: Path, model: str, levels: list[int], out_dir: Path, window_ms: int, max_trials: int,
            stability_pct: float) -> list[dict]:
    from serving.loadtest import sweep
    from serving.local.launcher import LocalTriton, free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
        return sweep(server.grpc_url, server.metrics_url, model, levels, 1, out_dir, window_ms, stability_pct,
                     max_trials)


def choose(rows: list[dict], baseline: tuple[int, str], tolerance: float) -> dict:
    """The candidate with the best last-level throughput whose first-level p50 is within tolerance of
    the baseline's."""
    levels = sorted({r["concurrency"] for r in rows})
    first, last = levels[0], levels[-1]
    at = {(r["delay_us"], r["preferred"], r["concurrency"]): r for r in rows}
    base_p50 = at[(*baseline, first)]["p50_ms"]
    ok = [(d, p) for (d, p, c) in at if c == first and at[(d, p, c)]["p50_ms"] <= base_p50 * (1 + tolerance)]
    best = max(ok, key=lambda k: at[(*k, last)]["infer_per_s"])
    return {"delay_us": best[0], "preferred": best[1], "first": first, "last": last, "baseline_p50_ms": base_p50,
            "p50_ms": at[(*best, first)]["p50_ms"], "infer_per_s": at[(*best, last)]["infer_per_s"],
            "baseline_infer_per_s": at[(*baseline, last)]["infer_per_s"]}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from export.triton_config import DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_PREFERRED_BATCH_SIZES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="repository holding the exported model")
    p.add_argument("--model", default="kaem_fmnist", help="model name")
    p.add_argument("--delays", default="0,100,500,2000", help="max_queue_delay_microseconds candidates")
    p.add_argument("--preferred", nargs="+", default=["64,128,256", "none"],
                   help="preferred_batch_size candidates: comma lists, or 'none'")
    p.add_argument("--concurrency", default="1,16,64", help="batch-1 concurrency levels (first and last decide)")
    p.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer measurement window")
    p.add_argument("--max-trials", type=int, default=6, help="perf_analyzer windows before giving up")
    p.add_argument("--p50-tolerance", type=float, default=0.05,
                   help="allowed concurrency-1 p50 increase over the shipped defaults (fraction)")
    p.add_argument("--csv", default="benchmarks/results/batching_sweep.csv", help="where to write every row")
    p.add_argument("--quick", action="store_true",
                   help="delays 0 and 100 µs, the default preferred setting, levels 1,4, short windows")
    args = p.parse_args(argv)
    delays = sorted({0, 100, DEFAULT_MAX_QUEUE_DELAY_US} if args.quick else {int(d) for d in args.delays.split(",")})
    preferred = ([DEFAULT_PREFERRED_BATCH_SIZES] if args.quick
                 else list(dict.fromkeys(_preferred(t) for t in args.preferred)))
    levels = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
    # quick (a smoke run of the machinery): short windows, and any measurement is accepted as stable
    window, trials, stability = (400, 4, 100.0) if args.quick else (args.window_ms, args.max_trials, 25.0)
    baseline = (DEFAULT_MAX_QUEUE_DELAY_US, _label(DEFAULT_PREFERRED_BATCH_SIZES))
    if DEFAULT_MAX_QUEUE_DELAY_US not in delays or DEFAULT_PREFERRED_BATCH_SIZES not in preferred:
        p.error("the candidates must include the shipped defaults "
                f"(delay {DEFAULT_MAX_QUEUE_DELAY_US}, preferred {baseline[1]}): they are the baseline")
    src = Path(args.model_repository)
    rows: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for pref in preferred:
            for delay in delays:
                repo = candidate_repository(src, args.model, Path(tmp) / "repo", delay, pref)
                print(f"delay {delay} µs, preferred {_label(pref)}: serving and measuring ...", file=sys.stderr,
                      flush=True)
                for r in measure(repo, args.model, levels, Path(tmp) / f"perf-{delay}-{_label(pref)}", window,
                                 trials, stability):
                    rows.append({"delay_us": delay, "preferred": _label(pref), **{k: r[k] for k in COLUMNS[2:]}})
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"{'delay µs':>9} {'preferred':>11} {'conc.':>6} {'infer/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'avg batch':>10}")
    for r in rows:
        print(f"{r['delay_us']:9d} {r['preferred']:>11} {r['concurrency']:6d} {r['infer_per_s']:9.0f} "
              f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['server_avg_batch'] or 0:10.2f}")
    c = choose(rows, baseline, args.p50_tolerance)
    print(f"\nchosen: max_queue_delay_microseconds {c['delay_us']}, preferred_batch_size {c['preferred']}: "
          f"{c['infer_per_s']:.0f} inferences/s at concurrency {c['last']} (shipped defaults "
          f"{c['baseline_infer_per_s']:.0f}), concurrency-{c['first']} p50 {c['p50_ms']:.2f} ms (defaults "
          f"{c['baseline_p50_ms']:.2f} ms, tolerance {100 * args.p50_tolerance:.0f} %)")
    same = (c["delay_us"], c["preferred"]) == baseline
    print("the shipped defaults are the choice" if same else
          "update DEFAULT_MAX_QUEUE_DELAY_US / DEFAULT_PREFERRED_BATCH_SIZES in export/triton_config.py to the choice")
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
