"""``kaem-metrics``: read Triton's Prometheus endpoint and report, per model and version, request
counts, failures, p50/p90/p99 latency, queue vs compute time and the average dynamic batch.

Triton 2.51 exports latency *summaries* (per-replica quantiles that cannot be aggregated);
fleet-wide percentiles come from client-side histograms, estimated by :func:`histogram_quantile`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

from training.cli import command
from training.errors import KaemError

QUANTILES = ("0.5", "0.9", "0.99")
_COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_count": "inference_count",  # rows (images), summed over requests
    "nv_inference_exec_count": "exec_count",  # model executions (merged batches)
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_input_duration_us": "compute_input_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_us",
    "nv_inference_compute_output_duration_us": "compute_output_us",
    "nv_inference_pending_request_count": "pending",
    # Triton's response cache, per model (only models whose config enables it: seed models)
    "nv_cache_num_hits_per_model": "cache_hits",
    "nv_cache_num_misses_per_model": "cache_misses",
}
_SUMMARY = "nv_inference_request_summary_us"


class MetricsError(KaemError):
    """The metrics endpoint cannot be read."""


def metrics_endpoint(url: str) -> str:
    """``localhost:8002`` / ``http://host:8002`` / ``.../metrics`` -> the full metrics URL."""
    url = url if "://" in url else f"http://{url}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def fetch_metrics_text(url: str, timeout_s: float = 5.0) -> str:
    endpoint = metrics_endpoint(url)
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout_s) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise MetricsError(f"cannot read Triton metrics at {endpoint} ({reason}): is the server running"
                           " with metrics on (kaem-serve / --metrics-port)?") from None


def _qkey(q: str) -> str:
    return "p" + str(round(float(q) * 100)) + "_us"  # 0.5 -> p50_us, 0.99 -> p99_us


def parse_metrics(text: str, model: str | None = None) -> dict[str, dict[str, dict]]:
    """``{model: {version: stats}}`` from Prometheus text; ``stats`` holds the raw cumulative counters
    plus ``requests``, ``failed``, ``p50_us``/``p90_us``/``p99_us`` (``None`` when the summary window
    is empty), ``avg_request_us``, ``avg_queue_us``, ``avg_compute_us`` (per successful request) and
    ``avg_batch_size`` (rows per execution)."""
    out: dict[str, dict[str, dict]] = {}

    def slot(labels: dict) -> dict | None:
        name, version = labels.get("model"), labels.get("version", "")
        if name is None or (model is not None and name != model):
            return None
        return out.setdefault(name, {}).setdefault(version, {"success": 0.0, "failures": {}})

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            s = slot(sample.labels)
            if s is None:
                continue
            if family.name == "nv_inference_request_failure":
                s["failures"][sample.labels.get("reason", "OTHER")] = sample.value
            elif family.name in _COUNTERS and sample.name in (family.name, family.name + "_total"):
                s[_COUNTERS[family.name]] = sample.value
            elif family.name == _SUMMARY and sample.name == _SUMMARY and "quantile" in sample.labels:
                s[_qkey(sample.labels["quantile"])] = None if math.isnan(sample.value) else sample.value
    for versions in out.values():
        for s in versions.values():
            _derive(s)
    return out


def _derive(s: dict) -> None:
    for key in _COUNTERS.values():
        s.setdefault(key, 0.0)
    for q in QUANTILES:
        s.setdefault(_qkey(q), None)
    s["failed"] = sum(s["failures"].values())
    s["requests"] = s["success"] + s["failed"]
    ok = s["success"]
    compute = s["compute_input_us"] + s["compute_infer_us"] + s["compute_output_us"]
    s["avg_request_us"] = s["request_us"] / ok if ok else None
    s["avg_queue_us"] = s["queue_us"] / ok if ok else None
    s["avg_compute_us"] = compute / ok if ok else None
    s["avg_batch_size"] = s["inference_count"] / s["exec_count"] if s["exec_count"] else None


def read_metrics(url: str = "localhost:8002", model: str | None = None, timeout_s: float = 5.0) -> dict:
    """Scrape a running server: see :func:`parse_metrics`."""
    return parse_metrics(fetch_metrics_text(url, timeout_s), model)


def _counts(stats: dict) -> dict:
    return {(m, v): (s["success"], s["failed"], s["inference_count"], s["exec_count"])
            for m, versions in stats.items() for v, s in versions.items()}


def read_settled(url: str = "localhost:8002", model: str | None = None, quiet_s: float = 0.1,
                 timeout_s: float = 5.0) -> dict:
    """Like :func:`read_metrics`, but scrape until two scrapes ``quiet_s`` apart agree: Triton records
    a request's statistics just after sending its response, so a scrape taken right after the last
    response can miss that request (and the next window would count it)."""
    last = read_metrics(url, model)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = read_metrics(url, model)
        if _counts(now) == _counts(last):
            return now
        last = now
    return last


def delta(after: dict, before: dict) -> dict:
    """Stats of one ``{model: {version: stats}}`` window from two scrapes (counters subtract;
    summary quantiles are taken from ``after``)."""
    out: dict[str, dict[str, dict]] = {}
    for name, versions in after.items():
        for version, a in versions.items():
            b = before.get(name, {}).get(version, {})
            d = {k: a[k] - b.get(k, 0.0) for k in _COUNTERS.values() if k != "pending"}
            d["pending"] = a["pending"]
            d["failures"] = {r: n - b.get("failures", {}).get(r, 0.0) for r, n in a["failures"].items()}
            d.update({_qkey(q): a[_qkey(q)] for q in QUANTILES})
            _derive(d)
            out.setdefault(name, {})[version] = d
    return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Quantile ``q`` from cumulative ``(upper_bound, count)`` buckets, interpolating linearly inside
    a bucket as PromQL's ``histogram_quantile`` does; NaN when empty."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank:
            if math.isinf(upper):
                return lower  # PromQL: the highest finite bound
            return lower + (upper - lower) * (rank - below) / (cum - below) if cum > below else upper
        lower, below = upper, cum
    return lower


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_report(stats: dict) -> str:
    """Human-readable table of :func:`parse_metrics` output."""
    if not stats:
        return "no per-model metrics yet (no model loaded, or the --model filter matched nothing)"
    head = (f"{'model':<20} {'ver':>3} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
            f" {'queue ms':>9} {'compute ms':>10} {'avg batch':>9}")
    rows = [head, "-" * len(head)]
    for name in sorted(stats):
        for version, s in sorted(stats[name].items()):
            vals = [s.get(k) for k in ("p50_us", "p90_us", "p99_us", "avg_queue_us", "avg_compute_us")]
            ms = [_num(None if v is None else v / 1000, 2 if i < 3 else 3) for i, v in enumerate(vals)]
            rows.append(
                f"{name:<20} {version:>3} {s['requests']:>9,.0f} {s['failed']:>7,.0f} {ms[0]:>8} {ms[1]:>8}"
                f" {ms[2]:>8} {ms[3]:>9} {ms[4]:>10} {_num(s['avg_batch_size'], 2):>9}"
            )
            failures = {r: n for r, n in s["failures"].items() if n}
            if failures:
                rows.append(" " * 25 + "failures: " + ", ".join(f"{r}={n:.0f}" for r, n in sorted(failures.items())))
            if s["cache_hits"] or s["cache_misses"]:
                rows.append(" " * 25 + f"response cache: {s['cache_hits']:,.0f} hits, {s['cache_misses']:,.0f} misses")
    rows.append("p50/p90/p99: Triton's sliding-window summary (this replica only); queue/compute: average per"
                " successful request; avg batch: rows / executions")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaem-metrics", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="localhost:8002", help="Triton metrics address (host:port)")
    p.add_argument("--model", default=None, help="only this model (default: all)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the endpoint")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats = read_metrics(args.url, args.model, args.timeout)
    print(format_report(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
