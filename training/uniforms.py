"""Seeds to uniforms: the one versioned, counter-based generator shared by training, eager
sampling and the serving client, so that a seed means the same image everywhere.

Generator ``kaem-u-splitmix64-v1`` (a pure function of (seed, coordinate), no state):

    key      = SplitMix64 output #1 for state ``seed``          (= mix64(seed + G))
    v_j      = SplitMix64 output #(j+1) for state ``key``        (= mix64(key + (j+1)·G))
    u_j      = ((v_j >> 41) + 0.5) / 2**23                        (exact in float32, inside (0, 1))

with ``G = 0x9E3779B97F4A7C15`` and the standard SplitMix64 finaliser ``mix64``; all arithmetic is
modulo 2**64. ``j`` runs over the ``D`` coordinates of the served ``u`` layout (see
:func:`u_layout`). Changing any of this is a new ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from training.errors import KaemError

if TYPE_CHECKING:
    import torch

GENERATOR_VERSION = "kaem-u-splitmix64-v1"
MAX_SEED = 2**63 - 1
MAX_SEEDS_PER_CALL = 1_000_000

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrap-around arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms_for_seeds(seeds: Sequence[int] | np.ndarray, dim: int) -> np.ndarray:
    """Uniforms ``[len(seeds), dim]`` (float32, each in (0, 1)) for image seeds (ints in [0, 2**63))."""
    s = np.asarray(seeds, dtype=np.int64)
    if s.ndim != 1:
        raise ValueError("seeds must be a 1-D sequence of integers")
    if (s < 0).any():
        raise ValueError("seeds must be non-negative")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    with np.errstate(over="ignore"):
        key = _mix64(s.astype(np.uint64) + _G)
        j = np.arange(1, dim + 1, dtype=np.uint64)
        v = _mix64(key[:, None] + j[None, :] * _G)
    mant = (v >> np.uint64(41)).astype(np.float64)
    return ((mant + 0.5) / float(2**23)).astype(np.float32)


def mix_seed(*parts: int) -> int:
    """Hash integers (e.g. (seed, step, rank)) into one 63-bit seed for a ``torch.Generator``."""
    with np.errstate(over="ignore"):
        acc = np.array([0x243F6A8885A308D3], dtype=np.uint64)
        for part in parts:
            acc = _mix64(acc ^ _mix64(np.array([int(part) & (2**64 - 1)], dtype=np.uint64) + _G))
    return int(acc[0] >> np.uint64(1))


def step_generator(seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for one training step: per-step noise depends on (seed, step, rank) only,
    never on how many draws earlier steps made, so a resumed run sees the same noise."""
    import torch  # lazy: the serving client imports this module and must start fast

    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, step, rank))
    return gen


# ----------------------------------------------------------------------------------------------
# Layout of u and quantile steering


PRIOR_KINDS = ("univariate", "mixture", "folded", "independent")


def u_layout(prior_kind: str, P: int, Q: int) -> tuple[int, int]:
    """(D, first ITS column) of the served ``u``: univariate and folded ``[P]`` (all ITS, shared over q);
    independent ``[Q·P]`` (one ITS uniform per (q, p), q-major); mixture ``[2Q]`` = Q
    component-selection uniforms, then Q ITS uniforms."""
    if prior_kind in ("univariate", "folded"):
        return P, 0
    if prior_kind == "independent":
        return Q * P, 0
    if prior_kind == "mixture":
        return 2 * Q, Q
    raise ValueError(f"unknown prior kind {prior_kind!r}; expected one of {', '.join(PRIOR_KINDS)}")


def truncate(u: np.ndarray, truncation: float, its_start: int) -> np.ndarray:
    """Truncation trick on the ITS uniforms only: ``u' = 0.5 + T (u - 0.5)``; T = 1 is off (u is
    returned bit for bit: float32 ``(u - 0.5) + 0.5`` would drop low bits of small u).
    Component-selection uniforms (columns before ``its_start``) are never touched. T itself is first rounded to
    float32, the type of the seed model's ``truncation`` input (export/seed_graph.py), so that a seed and a T
    give the same u whether the client or the served graph computes it."""
    if not 0.0 < truncation <= 1.0:
        raise ValueError(f"truncation must be in (0, 1], got {truncation}")
    t = float(np.float32(truncation))
    out = np.array(u, dtype=np.float32, copy=True)
    if t != 1.0:
        its = out[..., its_start:].astype(np.float64)
        out[..., its_start:] = (0.5 + t * (its - 0.5)).astype(np.float32)
    return out


def seeds_to_u(seeds: Sequence[int], dim: int, its_start: int, truncation: float = 1.0) -> np.ndarray:
    """The served ``u[N, dim]`` for image seeds, truncation applied to the ITS columns only."""
    return truncate(uniforms_for_seeds(seeds, dim), truncation, its_start)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


# Before inversion NaN in u becomes 0.5 and u is clamped into [U_EPS, 1 - U_EPS] (eager and in the graph: §9).
U_EPS = 1e-6

class SeedError(KaemError):
    """A seed list that cannot be parsed or is out of range."""


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-63"``, ``"7"`` or ``"0-9,100,200-203"`` into a list of seeds (inclusive ranges)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        m = _RANGE.match(part)
        if not m:
            raise SeedError(
                f"bad seed range {text!r}: use non-negative integers like '0-63', '7' or '0-9,100'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise SeedError(f"bad seed range {part.strip()!r}: the end is smaller than the start")
        if hi > MAX_SEED:
            raise SeedError(f"seed {hi} is too large: seeds must be below 2**63")
        if len(seeds) + (hi - lo + 1) > MAX_SEEDS_PER_CALL:
            raise SeedError(f"too many seeds: at most {MAX_SEEDS_PER_CALL} per call")
        seeds.extend(range(lo, hi + 1))
    return seeds
