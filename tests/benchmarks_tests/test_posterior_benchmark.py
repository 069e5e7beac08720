"""The posterior-estimator benchmark's quick mode runs end to end and times every estimator."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from testpaths import ROOT

ESTIMATORS = ("is", "is_ula", "ula", "mala", "thermo(N_t=2)", "thermo(N_t=5)", "thermo(N_t=10)")


def test_posterior_benchmark_quick() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/posterior.py", "--preset", "digits", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Table rows: "<estimator> <ms/step> <images/s> <ratio to IS>  <health stats>".
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+\S+\s+\S+", line)
        if m and m.group(1) in ESTIMATORS:
            rows[m.group(1)] = float(m.group(2))
    for name in ESTIMATORS:
        assert name in rows, f"{name} missing from the table:\n{proc.stdout}"
        assert math.isfinite(rows[name]) and rows[name] > 0, f"{name}: ms/step {rows[name]}"
