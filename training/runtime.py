"""Process settings of the training step that are not numerics.

glibc hands large freed blocks back to the operating system (a trimmed heap top, or an unmapped chunk), so
every training step's fresh tens-of-megabyte tensors (the IS step's [B, N_s, D] decoder noise and likelihood
buffers: 31 MB each) page-fault their memory in again: ~8 ms per 31 MB on this machine class, about a tenth
of a step. Keeping freed memory in the process removes that; the cost is a resident size that stays at the
step's peak, which a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mapped afresh
_TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MB (and up to 1 GiB of free heap top) for reuse. Idempotent;
    False where the C library is not glibc (nothing changes there)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
