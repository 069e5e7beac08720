"""Shared CLI plumbing: user errors exit non-zero with a message (never a traceback), and a
device argument that fails clearly when CUDA is asked for but absent."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one message, exit code 2."""


def user_errors(*extra: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., int]]:
    """Decorator for ``main``: turn UserError/KeyError/ValueError-style failures into exit code 2."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., int]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> int:
            try:
                rc = fn(*args, **kwargs)
                return 0 if rc is None else int(rc)
            except (UserError, *extra) as err:
                msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                print(f"error: {msg}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130

        return inner

    return wrap


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    return torch.device(name)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for real defaults only: None ("the preset's") and off-switches stay silent."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)
