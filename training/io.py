"""Files written whole or not at all, and PyTorch files read with one set of checks (torch-free at import).

:func:`atomic_write` is the project's only way to write a file another process may read (checkpoints, reports,
PNGs, idx files, ONNX graphs, config.pbtxt): temp file in the same folder, fsync, rename. :func:`load_torch_file`
is its only ``torch.load``: weights only, and a missing or unreadable file becomes the caller's domain error.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from training.errors import KaemError

# What torch.load raises for a truncated, foreign or corrupt file.
UNREADABLE = (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError)


class StorageError(KaemError, OSError):
    """A file that could not be written (a full disk, a read-only or uncreatable folder). Also an ``OSError``
    (errno, strerror, filename), so callers that add context to ``OSError`` keep doing so."""

    note = ""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}{self.note}"


def storage_error(err: OSError, path: str | Path, note: str = "") -> StorageError:
    out = StorageError(err.errno, err.strerror or str(err), str(path))
    out.note = note
    return out


class LineLog:
    """An append-only text log (a run's stats.jsonl): each line written and flushed at once; a failure to write
    (a full disk) is a :class:`StorageError` naming the file. The lines written before it stay."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "a")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise storage_error(err, self.path) from err

    def write_line(self, line: str) -> None:
        try:
            self._fh.write(line + "\n")
            self._fh.flush()
        except OSError as err:
            raise storage_error(err, self.path, "; the lines before it are kept") from err

    def close(self) -> None:
        with contextlib.suppress(OSError):  # an unwritten line was reported by write_line
            self._fh.close()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], check: Callable[[Path], None] | None = None
                 ) -> Path:
    """``write(binary file)`` into a temp file next to ``path``, fsync, optionally ``check(temp path)`` (raise to
    keep the old file), then rename: a crash, a full disk or a failed check never leaves half a file under
    ``path``. An operating-system failure to write becomes a :class:`StorageError` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except StorageError:
        raise
    except OSError as err:
        raise storage_error(err, path, "; the previous file, if any, is unchanged") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def save_torch_file(path: str | Path, payload: Any) -> Path:
    """``torch.save(payload)`` written with :func:`atomic_write`. Serialised in memory first: torch's zip writer
    turns a failed write (a full disk) into a ``RuntimeError`` about stream positions, not an ``OSError``."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_torch_file(path: str | Path, what: str, error: type[KaemError], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing file or one torch cannot read raises ``error`` with a
    message naming ``what`` and the file (its size, and the first line of torch's own complaint)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    _check_zip_records(path, what, error)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as err:
        first = (str(err).splitlines() or [""])[0][:160]
        raise error(f"cannot read {what} {path} ({path.stat().st_size} bytes): truncated or not a PyTorch file "
                    f"({type(err).__name__}: {first})") from err


def _check_zip_records(path: Path, what: str, error: type[KaemError]) -> None:
    """torch.save writes a zip archive with a CRC-32 per record, but torch.load never checks them: bytes flipped
    inside a tensor load silently as other weights (and give other images). Check every record's CRC first."""
    try:
        if not zipfile.is_zipfile(path):
            return  # not a zip (a legacy or foreign file): torch.load gives its own error
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as err:
        raise error(f"cannot read {what} {path}: damaged archive ({type(err).__name__}: {str(err)[:160]})") from err
    if bad is not None:
        raise error(f"{what} {path} is damaged: its record {bad} fails its CRC-32 check (the file changed after it "
                    "was written: a disk or copy error). Use another copy or re-create it")
