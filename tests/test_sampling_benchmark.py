"""The sampling benchmark's quick mode runs end to end and times KAEM (eager and onnxruntime), the
latent EBM and the VAE."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("KAEM eager", "KAEM ORT", "latent EBM", "VAE")
# Table rows: "<model> <batch> <ms/batch> <images/s> <calls>"; the model label may hold a space.
ROW = re.compile(r"^(KAEM eager|KAEM prior|KAEM ORT|latent EBM|VAE)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\d+)\s*$")


def test_sampling_benchmark_quick() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/sampling.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows: dict[tuple[str, int], float] = {}
    for line in proc.stdout.splitlines():
        m = ROW.match(line)
        if m:
            rows[(m.group(1), int(m.group(2)))] = float(m.group(4))
    batches = sorted({bs for _, bs in rows})
    assert batches == [1, 8], f"expected batches 1 and 8 in the table:\n{proc.stdout}"
    for name in MODELS:
        for bs in batches:
            assert (name, bs) in rows, f"{name} at batch {bs} missing from the table:\n{proc.stdout}"
            ips = rows[(name, bs)]
            assert math.isfinite(ips) and ips > 0, f"{name} at batch {bs}: images/s {ips}"
