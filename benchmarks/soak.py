"""Soak benchmark: the real local Triton under constant perf_analyzer load for minutes, watching the server's memory,
its tail latency, failed requests and the shared memory its Python-backend stubs use.

The checkpoint is exported (the production export and config) into a temporary repository and served with
kaem-serve's flags; --model-repository DIR --model NAME serves an existing repository instead. perf_analyzer (from
the tritonclient 2.51 wheel, as kaem-loadtest installs it) keeps --concurrency batch-1 requests in flight over gRPC
with valid uniforms (serving/perf_data.py): first for the warm-up, then for the measured phase, which it splits into
5 fixed time windows (--measurement-mode time_windows, -s 0 so that it never stops early; it sleeps 1.2x -p per
window, so -p is 5/6 of a fifth of the measured length). perf_analyzer 2.51 does have a per-request export
(--profile-export-file), but it records every request's input and output tensors (about 20 KB of JSON per request for
this model: 350 MB for 11 s at concurrency 16), so the p99 of the first and of the last 20 % of the requests are its
p99 of the first and of the last window. Once a second the script records the resident memory (VmRSS in
/proc/<pid>/status) of tritonserver plus all its descendants (the Python-backend stubs) and the listing of /dev/shm.

    python benchmarks/soak.py [--minutes 10] [--warmup 60] [--concurrency 16] [--json PATH]
                              [--checkpoint checkpoints/kaem_fmnist.pt | --model-repository DIR --model NAME]
    python benchmarks/soak.py --short     # 20 s warm-up + 60 s measured (the test suite runs this)

Targets (printed with PASS/FAIL beside the measured values):
  memory growth: the slope of a least-squares line through the server's total RSS over the measured phase, times
    max(measured length, 10 minutes), at most 40 MB. For the full 10-minute run that is the growth over the run;
    a shorter run (--short, or --minutes below 10) is judged on its slope extrapolated to 10 minutes, which decides
    --short: a model keeping 16 KB per request at 1,000 requests/s (about 940 MB a minute) fails it either way, and
    so does any leak above 68 KB/s, although that reaches 40 MB only after 10 minutes. The growth over the measured
    length itself is printed as well (MB = 2^20 bytes, as /proc counts kB of 1024 bytes).
  p99 latency of the last 20 % of the measured requests at most 1.5x the p99 of the first 20 % (client side).
  0 failed requests (perf_analyzer stops at the first one; the server's failure counter is read as well).
  /dev/shm back to its starting listing after the server stopped: no region the server mapped is left, and no new
    region that no process maps (regions other processes create or remove meanwhile, such as another Triton's on a
    shared machine, are listed but not held against this server).

Exit code 0 when every target passes, 1 when one fails (the summary says which), 2 for usage errors. The server, the
sampler and perf_analyzer share this machine's cores: compare runs on the same machine, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# run as a script: the project's packages first, not this folder's serving.py (it would shadow `serving`)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.contract import DEFAULT_MODEL_NAME
from serving.loadtest import PERF_WHEEL, PerfAnalyzer, ensure_perf_analyzer
from serving.local.launcher import LocalTriton, free_ports
from serving.metrics import MetricsError, delta, read_settled
from serving.perf_data import contract_from_repository, write_perf_input
from training.cli import HelpFormatter, UserError, command

ROOT = Path(__file__).resolve().parent.parent
GROWTH_LIMIT_MB = 40.0
GROWTH_HORIZON_S = 600.0  # the limit holds per 10 minutes of load: shorter runs are extrapolated to 10 minutes
P99_RATIO_LIMIT = 1.5
N_WINDOWS = 5  # the measured phase in fifths: the first and the last hold the first and the last 20 % of requests
PA_WINDOW_STRETCH = 1.2  # perf_analyzer 2.51 sleeps 1.2x --measurement-interval per time window
SHORT_WARMUP_S, SHORT_MEASURED_S = 20.0, 60.0
DEFAULT_WARMUP_S, DEFAULT_MINUTES = 60.0, 10.0
PROGRESS_EVERY_S = 10.0
SAMPLE_EVERY_S = 1.0
SHM_DIR = Path("/dev/shm")
_PASS = re.compile(r"Pass \[(\d+)\] throughput: ([\d.]+) infer/sec\. p99 latency: (\d+) usec")
_UNSTABLE = "Failed to obtain stable measurement"


# --- /proc and /dev/shm ------------------------------------------------------------------------------------------

def _ppid(pid: str) -> int | None:
    """Parent of a live process, None for a gone or zombie one."""
    try:  # the fields after "(comm)": state, ppid, ...
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else int(fields[1])


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (one pass over /proc)."""
    kids: dict[int, list[int]] = {}
    alive = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (parent := _ppid(entry.name)) is not None:
            alive.add(int(entry.name))
            kids.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root] if root in alive else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += kids.get(pid, [])
    return tree


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (1024 bytes), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def shm_mapped(pid: int) -> set[str]:
    """Names of the /dev/shm files ``pid`` maps."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    prefix = f"{SHM_DIR}/"
    return {line.split(prefix, 1)[1].removesuffix(" (deleted)").strip()
            for line in text.splitlines() if prefix in line}


def shm_listing() -> dict[str, int]:
    """{name: size in bytes} of the files in /dev/shm."""
    out = {}
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return out
    for entry in entries:
        with contextlib.suppress(OSError):  # removed meanwhile
            out[entry.name] = entry.stat(follow_symlinks=False).st_size
    return out


def shm_mappers(names: set[str]) -> dict[str, int]:
    """{name: pid of one live process that maps it} for those of ``names`` some process maps."""
    found: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and len(found) < len(names):
            for name in shm_mapped(int(entry.name)) & (names - set(found)):
                found[name] = int(entry.name)
    return found


# --- sampling ----------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    t: float  # seconds since the server was ready
    rss_kb: int  # tritonserver + descendants
    processes: int
    shm: dict[str, int]


class Sampler(threading.Thread):
    """Once a second: the server tree's total RSS and /dev/shm; the names of the shm files the tree maps; a
    progress line every PROGRESS_EVERY_S seconds."""

    def __init__(self, pid: int, clock: Callable[[], float], status: Callable[[], str]) -> None:
        super().__init__(daemon=True)
        self.pid, self.clock, self.status = pid, clock, status
        self.samples: list[Sample] = []
        self.pids: set[int] = set()
        self.mapped: set[str] = set()
        self._done = threading.Event()

    def sample(self) -> Sample:
        tree = process_tree(self.pid)
        self.pids.update(tree)
        total = 0
        for pid in tree:
            total += rss_kb(pid) or 0
            self.mapped |= shm_mapped(pid)
        s = Sample(self.clock(), total, len(tree), shm_listing())
        self.samples.append(s)
        return s

    def run(self) -> None:
        next_progress = PROGRESS_EVERY_S
        while True:
            s = self.sample()
            if s.t >= next_progress:
                next_progress += PROGRESS_EVERY_S
                print(f"[{s.t:5.0f} s] {self.status()}: server RSS {s.rss_kb / 1024:.1f} MB in {s.processes} "
                      f"processes, /dev/shm {len(s.shm)} entries", flush=True)
            if self._done.wait(SAMPLE_EVERY_S - (self.clock() - s.t) % SAMPLE_EVERY_S):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


# --- perf_analyzer -----------------------------------------------------------------------------------------------

@dataclass
class PerfRun:
    """One perf_analyzer process: its windows (end time, inferences/s, p99 ms) and how it ended."""

    n_windows: int
    rc: int | None = None
    started: float | None = None  # when the load began (seconds since the server was ready)
    ended: float | None = None
    windows: list[tuple[float, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        """All windows measured and no request failed: -s 0 never lets perf_analyzer call the load stable, so it
        ends with exit code 2 and the "Failed to obtain stable measurement" notice (0 would be fine too)."""
        ended_well = self.rc == 0 or (self.rc == 2 and any(_UNSTABLE in ln for ln in self.tail))
        return ended_well and not self.errors and len(self.windows) == self.n_windows

    def why(self) -> str:
        lines = self.errors[:3] or [ln for ln in self.tail if ln.strip()][-4:]
        return f"perf_analyzer exit code {self.rc}: " + " | ".join(ln.strip() for ln in lines)


def run_perf(pa: PerfAnalyzer, url: str, model: str, concurrency: int, input_json: Path, seconds: float,
             n_windows: int, log: Path, clock: Callable[[], float],
             on_window: Callable[[int, float, float], None] | None = None) -> PerfRun:
    """Keep ``concurrency`` requests in flight for about ``seconds``, measured in ``n_windows`` time windows."""
    window_ms = max(1, round(1000 * seconds / n_windows / PA_WINDOW_STRETCH))
    cmd = [str(pa.binary), "-m", model, "-i", "grpc", "-u", url, "-b", "1",
           "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(input_json),
           "--measurement-mode", "time_windows", "-p", str(window_ms), "-r", str(n_windows), "-s", "0",
           "--percentile=99", "-v"]
    run = PerfRun(n_windows)
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=pa.env,
                                stdin=subprocess.DEVNULL)
        try:
            for line in proc.stdout:
                out.write(line)
                run.tail = [*run.tail[-30:], line]
                if line.startswith("Request concurrency:"):
                    run.started = clock()
                elif m := _PASS.search(line):
                    run.windows.append((clock(), float(m.group(2)), int(m.group(3)) / 1000))
                    if on_window:
                        on_window(len(run.windows), run.windows[-1][1], run.windows[-1][2])
                elif "had error" in line:
                    run.errors.append(line.strip())
        except BaseException:  # Ctrl-C: never leave perf_analyzer running
            proc.kill()
            raise
        finally:
            run.rc = proc.wait()
    run.ended = clock()
    return run


# --- the soak ----------------------------------------------------------------------------------------------------

@dataclass
class Soak:
    model: str
    concurrency: int
    warmup_s: float
    measured_s: float  # asked for
    warm: PerfRun | None = None
    meas: PerfRun | None = None
    samples: list[Sample] = field(default_factory=list)
    mapped: set[str] = field(default_factory=set)
    processes: int = 0
    requests: int | None = None  # answered in the measured phase (server count)
    requests_total: int | None = None  # warm-up included
    server_failed: int | None = None
    server_exit: int | None = None  # tritonserver's exit code when it died during the soak
    stopped_in_s: float | None = None
    left_running: list[int] = field(default_factory=list)
    shm_start: dict[str, int] = field(default_factory=dict)
    shm_after: dict[str, int] = field(default_factory=dict)
    shm_others: dict[str, int] = field(default_factory=dict)  # leftovers mapped by another live process: pid


def _counts(stats: dict, model: str) -> tuple[int, int]:
    versions = stats.get(model, {}).values()
    return round(sum(v["success"] for v in versions)), round(sum(v["failed"] for v in versions))


def _settled(server: LocalTriton, model: str) -> dict | None:
    try:
        return read_settled(server.metrics_url, model)
    except MetricsError:
        return None


def run_soak(repo: Path, model: str, pa: PerfAnalyzer, input_json: Path, tmp: Path, concurrency: int,
             warmup_s: float, measured_s: float) -> Soak:
    soak = Soak(model, concurrency, warmup_s, measured_s, shm_start=shm_listing())
    phase = ["starting"]
    grpc_port, http_port, metrics_port = free_ports(3)
    server = LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                         log_file=tmp / "tritonserver.log")
    server.start()
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    sampler = Sampler(server.process.pid, clock, lambda: phase[0])
    sampler.start()

    def window(i: int, ips: float, p99: float) -> None:
        print(f"  window {i}/{N_WINDOWS}: {ips:,.0f} inferences/s, p99 {p99:.2f} ms", flush=True)

    try:
        print(f"server ready ({server.grpc_url}, log {server.log_file.name}); warm-up {warmup_s:g} s at concurrency "
              f"{concurrency}", flush=True)
        before = _settled(server, model)
        phase[0] = "warm-up"
        soak.warm = run_perf(pa, server.grpc_url, model, concurrency, input_json, warmup_s, 1, tmp / "warmup.log",
                             clock)
        if soak.warm.completed:
            middle = _settled(server, model)
            print(f"measured phase: {measured_s:g} s in {N_WINDOWS} windows", flush=True)
            phase[0] = "measured"
            soak.meas = run_perf(pa, server.grpc_url, model, concurrency, input_json, measured_s, N_WINDOWS,
                                 tmp / "measured.log", clock, window)
        else:
            middle = None
        after = _settled(server, model)
        if before is not None and after is not None:
            ok, soak.server_failed = _counts(delta(after, before), model)
            soak.requests_total = ok + soak.server_failed
            if middle is not None:
                ok_m, failed_m = _counts(delta(after, middle), model)
                soak.requests = ok_m + failed_m
        if not server.running:
            soak.server_exit = server.process.returncode
    finally:
        phase[0] = "stopping"
        sampler.stop()
        t_stop = time.monotonic()
        server.stop()
        # the stubs outlive tritonserver by a moment: wait for every process of the tree, then read /dev/shm
        deadline = time.monotonic() + 15
        while (alive := [p for p in sampler.pids if _ppid(str(p)) is not None]) and time.monotonic() < deadline:
            time.sleep(0.1)
        soak.stopped_in_s = time.monotonic() - t_stop
        soak.left_running = alive
    soak.samples, soak.mapped = sampler.samples, sampler.mapped
    soak.processes = max((s.processes for s in soak.samples), default=0)
    soak.shm_after = shm_listing()
    new = set(soak.shm_after) - set(soak.shm_start)
    soak.shm_others = shm_mappers(new - soak.mapped)
    if soak.warm and not soak.warm.completed or soak.meas and not soak.meas.completed:
        print(f"from the server log:\n{server.log_excerpt(10)}")
    return soak


# --- results -----------------------------------------------------------------------------------------------------

def summarize(soak: Soak) -> dict:
    """The JSON summary: measured values, each target's verdict and the RSS samples."""
    meas = soak.meas
    measured = meas is not None and meas.started is not None and len(meas.windows) == N_WINDOWS
    length = (meas.ended - meas.started) if measured else None
    pts = [(s.t, s.rss_kb / 1024) for s in soak.samples if measured and meas.started <= s.t <= meas.ended]
    slope = float(np.polyfit(*np.array(pts).T, 1)[0]) if len(pts) >= 3 else None  # MB per second
    growth = slope * length if slope is not None else None
    judged = slope * max(length, GROWTH_HORIZON_S) if slope is not None else None
    p99_first = meas.windows[0][2] if measured else None
    p99_last = meas.windows[-1][2] if measured else None
    ratio = p99_last / p99_first if measured and p99_first > 0 else None
    client_errors = sum(len(r.errors) for r in (soak.warm, soak.meas) if r)
    runs_ok = soak.warm is not None and soak.warm.completed and meas is not None and meas.completed
    failures = max(soak.server_failed or 0, client_errors, 0 if runs_ok and soak.server_exit is None else 1)
    new = set(soak.shm_after) - set(soak.shm_start)
    ours = sorted(new & soak.mapped)
    orphans = sorted(new - soak.mapped - set(soak.shm_others))
    shm_clean = not ours and not orphans and not soak.left_running
    targets = {
        "memory_growth": judged is not None and judged <= GROWTH_LIMIT_MB,
        "p99_ratio": ratio is not None and ratio <= P99_RATIO_LIMIT,
        "failed_requests": failures == 0,
        "shm_clean": shm_clean,
    }
    return {
        "model": soak.model, "concurrency": soak.concurrency, "warmup_s": soak.warmup_s,
        "measured_s": round(length, 2) if length is not None else None,
        "requests": soak.requests, "requests_total": soak.requests_total, "failures": failures,
        "rss_start_mb": round(pts[0][1], 2) if pts else None, "rss_end_mb": round(pts[-1][1], 2) if pts else None,
        "growth_mb": round(growth, 3) if growth is not None else None,
        "growth_10min_mb": round(judged, 3) if judged is not None else None,
        "slope_kb_per_s": round(slope * 1024, 3) if slope is not None else None,
        "growth_limit_mb": GROWTH_LIMIT_MB,
        "p99_first_ms": p99_first, "p99_last_ms": p99_last, "p99_ratio": round(ratio, 3) if ratio else None,
        "windows": [{"inferences_per_s": w[1], "p99_ms": w[2]} for w in meas.windows] if meas else [],
        "shm_clean": shm_clean, "shm_start": soak.shm_start, "shm_after": soak.shm_after,
        "shm_server_regions": sorted(soak.mapped - set(soak.shm_start)), "shm_left_by_server": ours,
        "shm_left_orphaned": orphans, "shm_left_by_others": soak.shm_others, "processes": soak.processes,
        "server_exit_during_soak": soak.server_exit, "processes_left_running": soak.left_running,
        "stop_s": round(soak.stopped_in_s or 0.0, 2),
        "perf_analyzer_errors": [r.why() for r in (soak.warm, soak.meas) if r and not r.completed],
        "targets": targets, "passed": all(targets.values()),
        "rss_samples": [[round(s.t, 2), round(s.rss_kb / 1024, 2)] for s in soak.samples],
    }


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def report(r: dict, short: bool) -> list[str]:
    verdict = {k: "PASS" if ok else "FAIL" for k, ok in r["targets"].items()}
    rule = ("slope x 10 min" if short or (r["measured_s"] or 0) < GROWTH_HORIZON_S else "over the run")
    server_regions = len(r["shm_server_regions"])
    if r["shm_clean"]:
        shm = f"back to its starting listing ({server_regions} region(s) of the server removed)"
    else:
        left = r["shm_left_by_server"] + r["shm_left_orphaned"]
        shm = f"{len(left)} region(s) left: {', '.join(left)}" if left else "server processes still running"
    lines = [
        f"requests: {_num(r['requests'], ',')} in the measured phase ({_num(r['requests_total'], ',')} with the "
        f"warm-up), failed {r['failures']}",
        f"server RSS (tritonserver + descendants, {r['processes']} processes): {_num(r['rss_start_mb'], '.1f')} MB"
        f" at the start of the measured phase, {_num(r['rss_end_mb'], '.1f')} MB at its end",
        "targets (measured | target):",
        f"  memory growth: {_num(r['growth_mb'], '.2f')} MB over {_num(r['measured_s'], '.0f')} s (slope "
        f"{_num(r['slope_kb_per_s'], '.2f')} KB/s, x 10 min = {_num(r['growth_10min_mb'], '.2f')} MB) | <= "
        f"{GROWTH_LIMIT_MB:g} MB ({rule})   {verdict['memory_growth']}",
        f"  p99 last 20 % / first 20 %: {_num(r['p99_last_ms'], '.2f')} / {_num(r['p99_first_ms'], '.2f')} ms = "
        f"{_num(r['p99_ratio'], '.2f')}{'x' if r['p99_ratio'] else ''} | <= {P99_RATIO_LIMIT:g}x"
        f"   {verdict['p99_ratio']}",
        f"  failed requests: {r['failures']} | 0   {verdict['failed_requests']}",
        f"  /dev/shm after the stop: {shm} | starting listing   {verdict['shm_clean']}",
    ]
    if r["server_exit_during_soak"] is not None:
        lines.append(f"  (tritonserver died during the soak, exit code {r['server_exit_during_soak']})")
    for err in r["perf_analyzer_errors"]:
        lines.append(f"  ({err})")
    others = {**r["shm_left_by_others"]}
    gone = sorted(set(r["shm_start"]) - set(r["shm_after"]))
    if others or gone:
        lines.append(f"  (/dev/shm changes by other processes, not counted: new {sorted(others) or 'none'}, "
                     f"removed {gone or 'none'})")
    failed = [k.replace("_", " ") for k, ok in r["targets"].items() if not ok]
    lines.append("result: PASS" if r["passed"] else f"result: FAIL ({', '.join(failed)})")
    return lines


class _Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Real defaults shown, the module docstring kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=_Help)
    p.add_argument("--minutes", type=float, default=None,
                   help=f"length of the measured phase (default {DEFAULT_MINUTES:g})")
    p.add_argument("--warmup", type=float, default=None,
                   help=f"seconds of load before the measured phase (default {DEFAULT_WARMUP_S:g})")
    p.add_argument("--short", action="store_true",
                   help=f"{SHORT_WARMUP_S:g} s warm-up + {SHORT_MEASURED_S:g} s measured; memory judged on the slope"
                        " x 10 minutes")
    p.add_argument("--concurrency", type=int, default=16, help="requests perf_analyzer keeps in flight")
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "kaem_fmnist.pt"),
                   help="checkpoint to export and serve (ignored with --model-repository)")
    p.add_argument("--model-repository", default=None, help="serve this exported repository instead")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model to load (the export's name, or one in the"
                   " repository)")
    p.add_argument("--json", default=None, help="write the summary (and the RSS samples) to this JSON file")
    return p


def _settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, float]:
    """(warm-up s, measured s); usage errors exit 2 through the parser."""
    if args.short:
        if args.minutes is not None or args.warmup is not None:
            p.error("--short fixes the lengths (20 s + 60 s): drop --minutes / --warmup")
        warmup, measured = SHORT_WARMUP_S, SHORT_MEASURED_S
    else:
        warmup = DEFAULT_WARMUP_S if args.warmup is None else args.warmup
        measured = 60 * (DEFAULT_MINUTES if args.minutes is None else args.minutes)
    if not measured >= 10:
        p.error(f"the measured phase must last at least 10 s ({N_WINDOWS} windows), got {measured:g} s")
    if not warmup >= 1:
        p.error(f"--warmup must be at least 1 s, got {warmup:g}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    return warmup, measured


@command
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    warmup_s, measured_s = _settings(p, args)
    model = args.model
    if args.model_repository:
        repo = Path(args.model_repository)
        if not repo.is_dir():
            raise UserError(f"model repository {repo} does not exist")
        try:
            contract_from_repository(repo, model)
        except FileNotFoundError as err:
            raise UserError(str(err)) from None
    elif not Path(args.checkpoint).is_file():
        raise UserError(f"checkpoint {args.checkpoint} does not exist (pass --checkpoint PATH, or --model-repository"
                        " DIR --model NAME)")
    if args.json:
        try:
            Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot write --json {args.json}: {err.strerror or err}") from None
    pa = ensure_perf_analyzer()
    with tempfile.TemporaryDirectory(prefix="kaem-soak-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.model_repository:
            from export.to_onnx import export_checkpoint  # torch: only where a model is exported

            repo = tmp / "repo"
            exported = export_checkpoint(args.checkpoint, repo, model)
            print(f"exported {args.checkpoint} to a temporary repository (parity vs eager: "
                  f"{exported.max_pixel_diff} grey levels)", flush=True)
        input_json = write_perf_input(tmp / "perf_input.json", contract_from_repository(repo, model))
        print(f"soak benchmark, model {model}: concurrency {args.concurrency}, batch-1 requests, warm-up "
              f"{warmup_s:g} s, measured {measured_s:g} s{' (--short)' if args.short else ''}; "
              f"perf_analyzer {PERF_WHEEL}", flush=True)
        soak = run_soak(repo, model, pa, input_json, tmp, args.concurrency, warmup_s, measured_s)
    result = summarize(soak)
    print("\n".join(report(result, args.short)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
