"""Process helpers for the tests that stop servers: which processes a process started, and whether one still
runs (from /proc, so they see the server's own children, such as the Python-backend stubs)."""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    try:  # the fields after "(comm)": state, ppid, ...
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is neither a zombie nor dead."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX"


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(stat.parent.name)
        if fields is not None and int(fields[1]) == pid and fields[0] not in "ZX":
            kids.append(int(stat.parent.name))
    return kids
