"""The training-step benchmark's quick mode runs end to end: the reference step, the fast IS step and the
preset's step timed side by side with their ratio to the reference, and the preset's time by region."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_quick() -> None:
    cmd = [sys.executable, "benchmarks/train_step.py", "--preset", "digits", "--quick", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^  (reference|is, no decoder noise|is|preset)\b.*?([\d.]+) ms\s+(\d+) img/s\s+([\d.]+)x "
                      r"reference", proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["reference", "is", "preset", "is, no decoder noise"], proc.stdout
    assert float(rows[0][3]) == 1.0 and all(float(ms) > 0 and float(x) > 0 for _, ms, _, x in rows)
    shares = dict(re.findall(r"^  (\w+)\s+([\d.]+) %$", proc.stdout, flags=re.M))
    assert {"prior_its", "decoder", "backward", "optimizer"} <= set(shares), proc.stdout
    assert 95 < sum(map(float, shares.values())) < 105  # the regions partition the profiled step
