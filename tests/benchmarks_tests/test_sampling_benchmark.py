"""The sampling benchmark's quick mode runs end to end and times KAEM (eager and onnxruntime), the
latent EBM and the VAE."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from testpaths import ROOT

MODELS = ("KAEM eager", "KAEM ORT", "latent EBM", "VAE")
# Table rows: "<model> <batch> <ms/batch> <images/s> <calls>"; the model label may hold a space.
ROW = re.compile(r"^(KAEM eager|KAEM prior|KAEM ORT|latent EBM|VAE)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\d+)\s*$")


@pytest.mark.slow
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
    # the served-graph targets: named ratios, the onnxruntime profile's top ops, the decoder roofline
    out = proc.stdout
    ratio_row = re.compile(r"^\s+(\d+)\s+\S+x\s+\S+x\s+(\S+)x\s+(\S+)x\s+(\S+) %\s+(\S+) %\s*$", re.M)
    found = {int(m.group(1)): m.groups()[1:] for m in ratio_row.finditer(out)}
    assert sorted(found) == [1, 8], out
    for eager_over_ort, ort_over_vae, share, share_ort in found.values():
        assert float(eager_over_ort) > 0 and float(ort_over_vae) > 0
        assert 0 < float(share) < 100 and 0 < float(share_ort) < 100
    for bs in (1, 8):
        m = re.search(rf"^onnxruntime profile, batch {bs} \((\d+) runs.*?\): (\w+) ([\d.]+) %", out, re.M)
        assert m and int(m.group(1)) >= 10 and 0 < float(m.group(3)) <= 100, out
        m = re.search(rf"^decoder roofline, batch {bs}: ([\d.]+) MFLOP per image.* ([\d.]+) of the measured peak "
                      r"([\d.]+) GFLOP/s", out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0 and float(m.group(3)) > 0, out
