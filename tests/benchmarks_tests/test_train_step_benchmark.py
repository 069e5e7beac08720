"""The training-step benchmark's quick mode runs end to end: the reference step, the fast IS step and the
preset's step timed side by side with their ratio to the reference, and the preset's time by region; on
fmnist also the frozen reference, the step of the revision the speed target was set on, from git history."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from testpaths import ROOT

ROW = r"^  ({names})\b.*?([\d.]+) ms\s+(\d+) img/s\s+((?:\s*[\d.]+x \w+)+)$"


def _run(preset: str) -> str:
    cmd = [sys.executable, "benchmarks/train_step.py", "--preset", preset, "--quick", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _rows(out: str) -> dict[str, dict[str, float]]:
    """variant -> {base: ratio} for every timed row."""
    names = "frozen|reference|is, no decoder noise|is|preset"
    rows = {}
    for name, ms, _, ratios in re.findall(ROW.format(names=names), out, flags=re.M):
        assert float(ms) > 0, out
        rows[name] = {base: float(r) for r, base in re.findall(r"([\d.]+)x (\w+)", ratios)}
    return rows


def test_train_step_benchmark_quick() -> None:
    out = _run("digits")
    rows = _rows(out)
    assert list(rows) == ["reference", "is", "preset", "is, no decoder noise"], out
    assert rows["reference"] == {"reference": 1.0} and all(r["reference"] > 0 for r in rows.values())
    assert "frozen reference skipped" not in out  # digits has no frozen step: nothing is attempted
    shares = dict(re.findall(r"^  (\w+)\s+([\d.]+) %$", out, flags=re.M))
    assert {"prior_its", "decoder", "backward", "optimizer"} <= set(shares), out
    assert 95 < sum(map(float, shares.values())) < 105  # the regions partition the profiled step


@pytest.mark.slow
def test_train_step_benchmark_times_the_frozen_revision_beside_today() -> None:
    has_history = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "c71c72e^{commit}"],
                                 capture_output=True).returncode == 0
    out = _run("fmnist")
    rows = _rows(out)
    if not has_history:  # a shallow clone: the benchmark says why and times the rest
        assert "frozen reference skipped: git archive c71c72e failed" in out, out
        assert list(rows) == ["reference", "is", "preset", "is, no decoder noise"], out
        return
    assert "frozen (revision c71c72e" in out, out
    assert list(rows) == ["frozen", "reference", "is", "preset", "is, no decoder noise"], out
    assert rows["frozen"]["frozen"] == 1.0 and rows["reference"]["reference"] == 1.0
    assert all(set(r) == {"frozen", "reference"} and min(r.values()) > 0 for r in rows.values()), out
