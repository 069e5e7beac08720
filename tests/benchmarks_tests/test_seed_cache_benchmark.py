"""The seed-model cache benchmark runs end to end on the real local Triton in a small configuration: misses and
hits timed, the server's cache counters equal to the requests it made, and the request sizes printed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from testpaths import ROOT


@pytest.mark.slow
@pytest.mark.triton
def test_seed_cache_benchmark_small() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/seed_cache.py", "--n", "10", "--rounds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "kaem_seed: 20 never-seen seeds vs the same seeds again" in out, out
    miss = float(re.search(r"miss\s+p50 ([\d.]+) ms", out).group(1))
    hit = float(re.search(r"hit\s+p50 ([\d.]+) ms", out).group(1))
    assert miss > 0 and hit > 0
    ratio = float(re.search(r"hit p50 / miss p50: ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(hit / miss, abs=0.01)
    # every repeated request was a hit, every first one a miss (warm-up requests are not cached)
    assert "server cache counters: hits 20, misses 20" in out, out
    assert "u model 328 bytes (FP32 x 82), seed model 12 bytes" in out, out
