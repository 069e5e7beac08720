"""Files written whole or not at all, and PyTorch files read with one set of checks (torch-free at import).

:func:`atomic_write` is the project's only way to write a file another process may read (checkpoints, reports,
PNGs, idx files, ONNX graphs, config.pbtxt): temp file in the same folder, fsync, rename. :func:`load_torch_file`
is its only ``torch.load``: weights only, and a missing or unreadable file becomes the caller's domain error.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from training.errors import KaemError

# What torch.load raises for a truncated, foreign or corrupt file.
UNREADABLE = (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], check: Callable[[Path], None] | None = None
                 ) -> Path:
    """``write(binary file)`` into a temp file next to ``path``, fsync, optionally ``check(temp path)`` (raise to
    keep the old file), then rename: a crash or a failed check never leaves half a file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def load_torch_file(path: str | Path, what: str, error: type[KaemError], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing file or one torch cannot read raises ``error`` with a
    message naming ``what`` and the file (its size, and the first line of torch's own complaint)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as err:
        first = (str(err).splitlines() or [""])[0][:160]
        raise error(f"cannot read {what} {path} ({path.stat().st_size} bytes): truncated or not a PyTorch file "
                    f"({type(err).__name__}: {first})") from err
