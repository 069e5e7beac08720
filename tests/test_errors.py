"""One error path: every error a user can act on derives from training.errors.KaemError, every command runs under
training.cli.command (exit 2 and one ``error:`` line for those, a traceback for anything else), and the mistakes a
fresh read found now end that way instead of in a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from testpaths import ROOT

import export
import serving
import training
from training.cli import command
from training.errors import KaemError, UserError

# Exceptions that are not user errors by design: the launcher's SIGTERM signal-to-exception bridge.
NOT_USER_ERRORS = {"serving.local.launcher._Stop"}


def _modules():
    for pkg in (training, export, serving):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("ort_shim"):  # runs inside Triton's Python stub, not in this process
                continue
            yield importlib.import_module(info.name)


def test_every_error_class_of_the_project_is_a_kaem_error() -> None:
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    assert len(found) >= 12, sorted(found)  # the domain errors of every package are seen
    stray = sorted(k for k, cls in found.items() if not issubclass(cls, KaemError) and k not in NOT_USER_ERRORS)
    assert stray == [], f"error classes outside the KaemError root: {stray}"


def test_command_reports_user_errors_and_keeps_tracebacks_for_bugs(capsys: pytest.CaptureFixture[str]) -> None:
    @command
    def user_mistake() -> int:
        raise UserError("--n must be >= 1")

    @command
    def bug() -> int:
        return {}["loss"]  # a programming error must not be dressed up as a user error

    assert user_mistake() == 2
    assert capsys.readouterr().err == "error: --n must be >= 1\n"
    with pytest.raises(KeyError):
        bug()


def test_a_diverging_run_ends_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "training.train", "--preset", "digits", "--lr", "1e6", "--steps", "200",
                        "--out", str(tmp_path / "run"), "--no-progress", "--samples", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "error: " in r.stderr and "lower --lr" in r.stderr, r.stderr
