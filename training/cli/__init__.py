"""The command-line layer: one module per ``kaem-*`` command in training/ (train, sample, eval, ...), each a
parser and a thin ``main`` over library functions, and what they share: :func:`command` (the one error path),
:class:`HelpFormatter` and :func:`resolve_device`. Torch-free at import (the serving commands use it too).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training.errors import KaemError, UserError

if TYPE_CHECKING:
    import torch

__all__ = ["HelpFormatter", "UserError", "command", "resolve_device"]


def command(fn: Callable[..., Any]) -> Callable[..., int]:
    """Decorator for every command's ``main``: a :class:`~training.errors.KaemError` prints ``error: <message>``
    on stderr and returns exit code 2 (no traceback); Ctrl-C returns 130; anything else is a bug and keeps its
    traceback. ``main`` returning None means success."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> int:
        try:
            rc = fn(*args, **kwargs)
            return 0 if rc is None else int(rc)
        except KaemError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return inner


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a user error."""
    import torch

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
