"""``kaem-loadtest``: a scripted perf_analyzer concurrency sweep over gRPC with valid-uniform input
data, written as CSV + a short markdown report that adds the server-side average batch size and the CPU time
one inference costs the client (perf_analyzer) and, for a server started here, the server (tritonserver and its
backend processes): on a machine they share, their sum caps the throughput at cores / CPU per inference.

perf_analyzer comes from the ``tritonclient==2.51.0`` wheel (the PyPI ``perf-analyzer`` package is
unusable here), installed with ``--no-deps`` under the project cache so it never touches the venv.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from serving.local.triton_env import LOCAL_TRITON_VERSION, TritonNotInstalled, cache_dir, triton_install
from serving.metrics import delta, read_settled
from serving.perf_data import write_perf_input
from training.cli import UserError, command
from training.errors import KaemError

PERF_WHEEL = f"tritonclient=={LOCAL_TRITON_VERSION}"
_LIB_LINKS = {"libb64.so.0d": "libb64", "libcudart.so.12": "libcudart"}  # soname -> hashed copy prefix


class LoadTestError(KaemError):
    """perf_analyzer cannot be obtained or a measurement failed; the message says what."""


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]


def ensure_perf_analyzer(cache: Path | None = None) -> PerfAnalyzer:
    """Install (once) and return the perf_analyzer binary bundled in the tritonclient 2.51 wheel."""
    root = (cache or cache_dir()) / "perf_analyzer"
    target = root / f"tritonclient-{LOCAL_TRITON_VERSION}"
    binary = target / "bin" / "perf_analyzer"
    if not binary.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".installing-", dir=root))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), PERF_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "bin" / "perf_analyzer").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise LoadTestError(f"could not install perf_analyzer ({' '.join(cmd[2:])} failed: is PyPI reachable?):\n"
                                + (done.stderr or done.stdout).strip()[-1500:])
        try:
            tmp.rename(target)
        except OSError:  # installed concurrently by another process
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        inst = triton_install()
        links = root / "lib"
        links.mkdir(exist_ok=True)
        for soname, prefix in _LIB_LINKS.items():
            link, real = links / soname, inst.lib(prefix)
            if not (link.is_symlink() and link.resolve() == real.resolve()):
                link.unlink(missing_ok=True)
                link.symlink_to(real)
    except TritonNotInstalled as err:
        raise LoadTestError(f"perf_analyzer needs libb64/libcudart from nvidia-pytriton: {err}") from None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(links), str(inst.libs), env.get("LD_LIBRARY_PATH")] if p)
    probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        raise LoadTestError(f"{binary} does not run: {(probe.stderr or probe.stdout).strip()[-800:]}")
    return PerfAnalyzer(binary, env)


def parse_concurrency(text: str) -> list[int]:
    """``"1,2,4"`` (list), ``"1:16:2"`` (perf_analyzer start:end:step) or ``"1:16:x2"`` (geometric)."""
    try:
        if ":" in text:
            start, end, *rest = text.split(":")
            step = rest[0] if rest else "1"
            lo, hi = int(start), int(end)
            if step.startswith("x"):
                factor = int(step[1:] or 2)
                if factor < 2:
                    raise ValueError
                levels = []
                c = lo
                while c <= hi:
                    levels.append(c)
                    c *= factor
            else:
                levels = list(range(lo, hi + 1, int(step)))
        else:
            levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise LoadTestError(f"bad --concurrency {text!r}: use a list '1,2,4,8', a range '1:16:2' or a geometric"
                         " range '1:16:x2' of positive integers")
    return levels


def _perf_row(csv_path: Path) -> dict[str, str]:
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("Concurrency")]
    if not rows:
        raise LoadTestError(f"perf_analyzer wrote no result row to {csv_path}")
    return rows[-1]


def run_level(pa: PerfAnalyzer, url: str, model: str, concurrency: int, batch_size: int, input_json: Path,
              csv_path: Path, measurement_interval_ms: int, stability_pct: float, max_trials: int) -> dict[str, str]:
    """One perf_analyzer run at one concurrency; returns its CSV row (latencies in µs)."""
    cmd = [str(pa.binary), "-m", model, "-i", "grpc", "-u", url, "-b", str(batch_size),
           "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(input_json),
           "-p", str(measurement_interval_ms), "-s", str(stability_pct), "-r", str(max_trials), "-f", str(csv_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=pa.env)
    log = csv_path.with_suffix(".log")
    log.write_text(" ".join(cmd) + "\n\n" + done.stdout + done.stderr)
    if done.returncode != 0 or not csv_path.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise LoadTestError(f"perf_analyzer failed at concurrency {concurrency} (exit {done.returncode});"
                            f" full output in {log}:\n{tail}")
    return _perf_row(csv_path)


_COLUMNS = ["concurrency", "batch_size", "infer_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
            "server_avg_batch", "server_queue_ms", "server_compute_ms", "server_requests", "server_failed",
            "client_cpu_us", "server_cpu_us"]


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's waited-for children: perf_analyzer runs, once reaped."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by the live process ``pid`` and its descendants, from /proc
    (Linux); None where that cannot be read. For the local server: tritonserver and its Python-backend stubs."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for p in entries:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(p)
        used[p] = (int(fields[11]) + int(fields[12])) / tick
    if pid not in used:
        return None
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += used.get(p, 0.0)
        stack.extend(children.get(p, ()))
    return total


def _us_per(before: float | None, after: float | None, n: float | None) -> float | None:
    """CPU µs per inference between two readings in seconds (None when a reading or the count is missing)."""
    return (after - before) / n * 1e6 if n and before is not None and after is not None else None


def sweep(url: str, metrics_url: str, model: str, levels: Sequence[int], batch_size: int, out_dir: Path,
          measurement_interval_ms: int = 2000, stability_pct: float = 25.0, max_trials: int = 6,
          n_inputs: int = 64, repository: Path | None = None, server_pid: int | None = None) -> list[dict]:
    """Run every concurrency level, one perf_analyzer process each, scraping the server's metrics
    before and after so that each row carries its own server-side average batch size, and the CPU time per
    inference of perf_analyzer and (with ``server_pid``, a local server's process) of the server over the
    same interval (every inference the server counted in it, warm-up and trial windows included)."""
    from serving.client import connect  # reads the served contract (and checks the server first)

    pa = ensure_perf_analyzer()
    grpc, served = connect(url, model)
    grpc.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    input_json = write_perf_input(out_dir / "perf_input.json", served.contract, n=n_inputs)
    rows = []
    for c in levels:
        before = read_settled(metrics_url, model)
        cpu0 = (_children_cpu_s(), server_pid and process_tree_cpu_s(server_pid))
        raw = run_level(pa, url, model, c, batch_size, input_json, out_dir / f"perf_c{c}.csv",
                        measurement_interval_ms, stability_pct, max_trials)
        cpu1 = (_children_cpu_s(), server_pid and process_tree_cpu_s(server_pid))
        d = next(iter(delta(read_settled(metrics_url, model), before).get(model, {}).values()), None)
        n = d and d["inference_count"]
        ms = {k: float(raw[f"p{k} latency"]) / 1000 for k in ("50", "90", "95", "99")}
        rows.append({
            "concurrency": c, "batch_size": batch_size, "infer_per_s": float(raw["Inferences/Second"]),
            **{f"p{k}_ms": v for k, v in ms.items()},
            "server_avg_batch": d and d["avg_batch_size"], "server_queue_ms": d and (d["avg_queue_us"] or 0) / 1000,
            "server_compute_ms": d and (d["avg_compute_us"] or 0) / 1000,
            "server_requests": d and d["requests"], "server_failed": d and d["failed"],
            "client_cpu_us": _us_per(cpu0[0], cpu1[0], n), "server_cpu_us": _us_per(cpu0[1], cpu1[1], n),
        })
    return rows


def write_results(rows: list[dict], out_dir: Path, meta: dict[str, str]) -> tuple[Path, Path]:
    """``loadtest.csv`` (one row per concurrency) and ``report.md``."""
    csv_path, md_path = out_dir / "loadtest.csv", out_dir / "report.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"# Load test: {meta['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| concurrency | inferences/s | p50 ms | p99 ms | server avg batch | server queue ms"
              " | server compute ms | client CPU µs/inference | server CPU µs/inference |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['infer_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
                     f" {num(r['server_avg_batch'], '.2f')} | {num(r['server_queue_ms'], '.3f')} |"
                     f" {num(r['server_compute_ms'], '.3f')} | {num(r['client_cpu_us'], '.0f')} |"
                     f" {num(r['server_cpu_us'], '.0f')} |")
    if len(rows) > 1 and rows[0]["infer_per_s"] > 0:
        lines += ["", f"Throughput at concurrency {rows[-1]['concurrency']} is"
                  f" {rows[-1]['infer_per_s'] / rows[0]['infer_per_s']:.2f}x concurrency {rows[0]['concurrency']}."]
    last = rows[-1] if rows else {}
    if last.get("client_cpu_us") and last.get("server_cpu_us"):
        cpu, cores = last["client_cpu_us"] + last["server_cpu_us"], len(os.sched_getaffinity(0))
        lines += ["", f"At concurrency {last['concurrency']} one inference costs {cpu:,.0f} µs of CPU (client"
                  f" {last['client_cpu_us']:,.0f}, server {last['server_cpu_us']:,.0f}): where client and server"
                  f" share the {cores} CPUs this process may use, throughput cannot pass about"
                  f" {cores * 1e6 / cpu:,.0f} inferences/s."]
    lines += ["", "Latencies are perf_analyzer's client-side percentiles; server columns come from Triton's"
              " metrics scraped before/after each level (average batch = rows / executions); CPU per inference"
              " is the CPU time perf_analyzer (and, for a server started here, tritonserver with its backend"
              " processes) used during the level over the inferences the server counted in it. perf_analyzer"
              " and the server share this machine's cores: compare ratios, not absolute numbers.", ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def build_parser() -> argparse.ArgumentParser:
    from serving.client import server_parser

    p = server_parser("kaem-loadtest", __doc__)
    p.add_argument("--metrics-url", default=None, help="Triton metrics address (default: host of --url, port 8002)")
    p.add_argument("--concurrency", default="1:16:x2", help="list '1,4,16', range '1:16:2' or geometric '1:16:x2'")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request (perf_analyzer -b)")
    p.add_argument("--measurement-interval", type=int, default=2000, help="perf_analyzer window in ms (-p)")
    p.add_argument("--stability", type=float, default=25.0, help="perf_analyzer stability threshold in %% (-s)")
    p.add_argument("--max-trials", type=int, default=6, help="perf_analyzer windows before giving up (-r)")
    p.add_argument("--out-dir", default="runs/loadtest", help="folder for CSV, report and raw perf_analyzer output")
    p.add_argument("--start-server", action="store_true", help="start a local kaem-serve on free ports for the run")
    p.add_argument("--model-repository", default="model_repository", help="repository for --start-server")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    from serving.local.launcher import LocalTriton, free_ports

    args = build_parser().parse_args(argv)
    levels = parse_concurrency(args.concurrency)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    server = None
    if args.start_server:
        grpc_port, http_port, metrics_port = free_ports(3)
        server = LocalTriton(args.model_repository, grpc_port=grpc_port, http_port=http_port,
                             metrics_port=metrics_port)
    with server or nullcontext():
        url = server.grpc_url if server else args.url
        metrics_url = server.metrics_url if server else args.metrics_url or f"{url.rsplit(':', 1)[0]}:8002"
        out_dir = Path(args.out_dir)
        t0 = time.time()
        rows = sweep(url, metrics_url, args.model, levels, args.batch_size, out_dir,
                     args.measurement_interval, args.stability, args.max_trials,
                     server_pid=server.process.pid if server and server.process else None)
    meta = {"model": args.model, "server": url + (" (started by kaem-loadtest)" if server else ""),
            "batch size per request": str(args.batch_size), "concurrency levels": ", ".join(map(str, levels)),
            "measurement window": f"{args.measurement_interval} ms", "perf_analyzer": PERF_WHEEL,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M"),
            "duration": f"{time.time() - t0:.0f} s"}
    csv_path, md_path = write_results(rows, out_dir, meta)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
