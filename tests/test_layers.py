"""The layering is enforced, not just drawn: import-linter's contracts in pyproject.toml hold (serving -> export ->
training; library code never imports the commands or the training loop), the linter really fails on a broken
contract, and the benchmarks never import the test suite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from testpaths import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_import_contracts_hold() -> None:
    r = _lint(ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout, r.stdout


def test_a_broken_contract_fails(tmp_path: Path) -> None:
    # The evaluation package does use the model package: a contract forbidding that must be reported broken.
    cfg = tmp_path / "broken.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["training"]\n\n[[tool.importlinter.contracts]]\n'
                   'name = "eval without the model"\ntype = "forbidden"\nsource_modules = ["training.eval"]\n'
                   'forbidden_modules = ["training.model"]\n')
    r = _lint(cfg)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr


def test_benchmarks_never_import_the_tests() -> None:
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("tests", "conftest", "testpaths")
                          or n.split(".")[0].endswith("_fixtures")]
    assert offenders == []
