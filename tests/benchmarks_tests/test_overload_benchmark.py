"""The overload benchmark's quick mode runs end to end against the real local Triton: a sweep, the saturating
concurrency by the 95 % rule, 4x that with a queue of one (so the queue must turn requests away), a healthy server
afterwards, and the client's rejections classified the way the server counts them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from testpaths import ROOT

# Table rows: concurrency, accepted/s, images/s, accepted p50/p99/max ms, queue-full n, its p99, timeouts n, ...
ROW = re.compile(r"^\s+(\d+)\s+([\d,]+)\s+[\d,]+\s+\S+\s+\S+\s+\S+\s+(\d+)\s+\S+\s+(\d+)\s+\S+\s+\S+(.*)$", re.M)


@pytest.mark.slow
@pytest.mark.triton
def test_overload_benchmark_quick() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/overload.py", "--quick", "--max-queue-size", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "queue policy max_queue_size 1, timeout" in out and "REJECT" in out, out
    rows = [(int(c), float(t.replace(",", "")), int(qf), int(to), rest) for c, t, qf, to, rest in ROW.findall(out)]
    sweep = {c: t for c, t, _, _, rest in rows if "saturating" not in rest}
    assert sorted(sweep) == [1, 2, 4], out
    sat = int(re.search(r"^saturating concurrency: (\d+) ", out, re.M).group(1))
    # the rule: the smallest concurrency whose throughput reaches 95 % of the sweep's maximum
    assert sat == min(c for c, t in sweep.items() if t >= 0.95 * max(sweep.values())), out
    overload = [r for r in rows if "4x saturating" in r[4]]
    assert len(overload) == 1 and overload[0][0] == 4 * sat, out
    assert overload[0][2] > 0, out  # a queue of one under 4x the saturating load turns requests away
    assert "server crashes: 0 (process alive, /v2/health/ready 200, a request afterwards served)" in out, out
    m = re.search(r"the server counted (\d+) REJECTED failures, the client saw (\d+) queue-timeout", out)
    assert m and m.group(1) == m.group(2), out  # Triton counts each queue timeout once, as the client saw it
    for target in ("target: p99 < 10 ms", "target: <= 1.5x", "target: 0, ready afterwards"):
        assert target in out, out
