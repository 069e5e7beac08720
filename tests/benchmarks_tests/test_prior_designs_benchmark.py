"""The latent-design screen (benchmarks/prior_designs.py) runs end to end in a tiny budget: the committed
kaem-train / kaem-eval command lines per design, a report per design and its section of the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testpaths import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_prior_designs_screen_quick(tmp_path: Path) -> None:
    if not (ROOT / "data" / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST not installed (make setup installs it)")
    table = tmp_path / "designs.md"
    table.write_text("# kept header\n")
    cmd = [sys.executable, "benchmarks/prior_designs.py", "--minutes", "0.05", "--n", "300", "--designs",
           "a-mixture-is,e-mixture-isula", "--out", str(tmp_path / "runs"), "--table", str(table)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = table.read_text()
    assert text.startswith("# kept header\n")  # the hand-written part of the file survives
    assert "<!-- screen: 0.05 minutes per design -->" in text and "## 0.05 minutes per design" in text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert [r.split("|")[1].strip()[:3] for r in rows] == ["(a)", "(e)"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) >= 1 and float(cells[4]) > 0  # gen. dim, h ratio, FD
        assert (tmp_path / "designs" / f"{cells[-1].split('/')[-1].rstrip(')')}").is_file()
    # Re-running with --reuse keeps the finished runs and rewrites the same section in place.
    again = subprocess.run(cmd + ["--reuse"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout
    assert table.read_text().count("<!-- screen: 0.05 minutes per design -->") == 1
    # A screen of one design adds to the section: (a)'s row and note stay, in the designs' order.
    one = [*cmd[:cmd.index("--designs") + 1], "e-mixture-isula", *cmd[cmd.index("--designs") + 2:], "--reuse"]
    again = subprocess.run(one, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = table.read_text().splitlines()
    assert [r for r in lines if r.startswith("| (")] == rows
    assert [n[:7] for n in lines if n.startswith("- **(")] == ["- **(a)", "- **(e)"]
