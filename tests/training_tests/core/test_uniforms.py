"""Seed → uniforms generator ``kaem-u-splitmix64-v1``: golden values checked against an independent
big-int SplitMix64, range and float32 exactness, uniformity, seed parsing, truncation, step RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from training.uniforms import (
    GENERATOR_VERSION,
    MAX_SEED,
    SeedError,
    mix_seed,
    parse_seeds,
    step_generator,
    truncate,
    u_layout,
    uniforms_for_seeds,
)

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

# uniforms_for_seeds([0, 1, 12345, 2**63 - 1], 6); each literal is the exact float32 value.
GOLDEN_SEEDS = [0, 1, 12345, 2**63 - 1]
GOLDEN_U = [
    [0.6524484753608704, 0.7012121081352234, 0.38712412118911743, 0.656413733959198, 0.7879285216331482,
     0.1462346911430359],
    [0.3681895136833191, 0.943564236164093, 0.04525703191757202, 0.7774369120597839, 0.21911507844924927,
     0.7743992209434509],
    [0.015829145908355713, 0.5009453892707825, 0.17751115560531616, 0.7054615616798401, 0.09281474351882935,
     0.30208832025527954],
    [0.41323620080947876, 0.4981146454811096, 0.22721236944198608, 0.02774125337600708, 0.6622498631477356,
     0.5854352116584778],
]


def _splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step in Python big-int arithmetic: (output, new state)."""
    state = (state + GOLDEN) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31), state


def _reference_uniforms(seed: int, dim: int) -> list[float]:
    """The module docstring's construction, written independently of numpy's uint64 wrap-around."""
    key, _ = _splitmix64(seed)
    state, out = key, []
    for _ in range(dim):
        v, state = _splitmix64(state)
        out.append(((v >> 41) + 0.5) / 2**23)
    return out


def test_splitmix64_known_answer() -> None:
    # Published SplitMix64 sequence for state 0.
    state, outs = 0, []
    for _ in range(3):
        o, state = _splitmix64(state)
        outs.append(o)
    assert outs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_golden_values() -> None:
    assert GENERATOR_VERSION == "kaem-u-splitmix64-v1"
    u = uniforms_for_seeds(GOLDEN_SEEDS, 6)
    assert u.dtype == np.float32 and u.shape == (4, 6)
    assert np.array_equal(u, np.array(GOLDEN_U, dtype=np.float32))
    # The literals are exact float32 values: converting them loses nothing.
    assert np.array_equal(np.array(GOLDEN_U, dtype=np.float32).astype(np.float64), np.array(GOLDEN_U))


@pytest.mark.parametrize("seed", GOLDEN_SEEDS + [2, 2**32, 2**32 - 1, 2**62 + 7, 987654321987])
def test_matches_independent_bigint_splitmix64(seed: int) -> None:
    want = np.array(_reference_uniforms(seed, 40), dtype=np.float64)
    got = uniforms_for_seeds([seed], 40)[0].astype(np.float64)
    assert np.array_equal(got, want)


def test_values_strictly_inside_and_on_the_float32_lattice() -> None:
    u = uniforms_for_seeds(np.arange(20000), 5)
    assert u.dtype == np.float32
    assert u.min() >= 2.0**-24 and u.max() <= 1.0 - 2.0**-24
    assert (u > 0).all() and (u < 1).all()
    # u = (2m + 1) / 2^24: an odd integer over 2^24, exact in float32's 24-bit significand.
    scaled = u.astype(np.float64) * 2**24
    assert np.array_equal(scaled, np.round(scaled))
    assert (scaled.astype(np.int64) % 2 == 1).all()


def test_roughly_uniform_and_uncorrelated() -> None:
    u = uniforms_for_seeds(np.arange(10000), 10).astype(np.float64)  # 1e5 draws
    flat = u.ravel()
    n = flat.size
    assert abs(flat.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(flat.var() - 1 / 12) < 5 * np.sqrt((1 / 80 - 1 / 144) / n)
    assert stats.kstest(flat, "uniform").pvalue > 1e-3
    corr = np.corrcoef(u, rowvar=False)
    off = corr[~np.eye(10, dtype=bool)]
    assert np.abs(off).max() < 5 / np.sqrt(u.shape[0])
    # Consecutive seeds are unrelated too.
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 5 / np.sqrt(u.shape[0])
    # Each column on its own is uniform (a broken per-coordinate counter would show here).
    for j in range(10):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-4, j


def test_row_depends_only_on_its_seed() -> None:
    both = uniforms_for_seeds([5, 42, 2**40], 8)
    alone = uniforms_for_seeds([42], 8)
    assert np.array_equal(both[1], alone[0])
    assert np.array_equal(uniforms_for_seeds([42, 42], 8), np.vstack([alone, alone]))
    # Coordinates are a counter: a shorter row is a prefix of a longer one.
    assert np.array_equal(uniforms_for_seeds([42], 3)[0], alone[0, :3])
    assert not np.array_equal(both[0], both[1])


def test_uniforms_for_seeds_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        uniforms_for_seeds([-1], 3)
    with pytest.raises(ValueError):
        uniforms_for_seeds([[1, 2]], 3)
    with pytest.raises(ValueError):
        uniforms_for_seeds([1], 0)
    assert uniforms_for_seeds([], 4).shape == (0, 4)


# ----------------------------------------------------------------------------------------------
# Seed strings


@pytest.mark.parametrize(
    "text,want",
    [("0-63", list(range(64))), ("7", [7]), ("0-9,100", list(range(10)) + [100]), (" 3 - 5 , 8", [3, 4, 5, 8]),
     (str(MAX_SEED), [MAX_SEED]), ("4-4", [4])],
)
def test_parse_seeds_accepts(text: str, want: list[int]) -> None:
    assert parse_seeds(text) == want


@pytest.mark.parametrize(
    "text", ["", "a", "5-3", "5-4", "-1", str(2**63), "0-2000000", "1,,2", "1-", "1.5", "0x10", "3,"]
)
def test_parse_seeds_rejects(text: str) -> None:
    with pytest.raises(SeedError):
        parse_seeds(text)


def test_parse_seeds_error_says_what_is_allowed() -> None:
    with pytest.raises(SeedError, match="0-63"):
        parse_seeds("abc")


# ----------------------------------------------------------------------------------------------
# Layout, truncation, step generators


def test_u_layout() -> None:
    assert u_layout("univariate", 20, 41) == (20, 0)
    assert u_layout("mixture", 40, 81) == (162, 81)
    with pytest.raises(ValueError):
        u_layout("mixed", 1, 1)


def test_truncate_touches_only_its_columns() -> None:
    u = uniforms_for_seeds(np.arange(50), 8)
    out = truncate(u, 0.5, 4)
    assert out.dtype == np.float32
    assert np.array_equal(out[:, :4], u[:, :4])
    np.testing.assert_allclose(out[:, 4:], 0.5 + 0.5 * (u[:, 4:].astype(np.float64) - 0.5), atol=1e-7)
    assert (out[:, 4:] >= 0.25).all() and (out[:, 4:] <= 0.75).all()
    assert np.array_equal(truncate(u, 1.0, 4), u)
    assert np.array_equal(truncate(u, 1.0, 0), u)
    assert np.array_equal(u, uniforms_for_seeds(np.arange(50), 8)), "input must not be modified"
    assert np.all(truncate(u, 1e-6, 0) > 0) and np.all(truncate(u, 1e-6, 0) < 1)


def test_truncate_uses_t_rounded_to_float32_as_the_seed_model_receives_it() -> None:
    u = uniforms_for_seeds(np.arange(1000), 8)
    t32 = float(np.float32(0.7))
    assert t32 != 0.7 and np.array_equal(truncate(u, 0.7, 0), truncate(u, t32, 0))
    by_double = (0.5 + 0.7 * (u.astype(np.float64) - 0.5)).astype(np.float32)
    assert not np.array_equal(truncate(u, 0.7, 0), by_double)  # so the rounding is not a no-op here
    assert np.array_equal(truncate(u, 1 - 1e-9, 0), u)  # a T that is 1 in float32 is no truncation


@pytest.mark.parametrize("t", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_truncate_rejects_bad_t(t: float) -> None:
    with pytest.raises(ValueError):
        truncate(np.full((2, 4), 0.3, dtype=np.float32), t, 2)


def test_step_generator_reproducible_and_distinct() -> None:
    def draw(seed: int, step: int, rank: int = 0) -> torch.Tensor:
        return torch.rand(16, generator=step_generator(seed, step, rank))

    torch.manual_seed(123)  # the global RNG must not matter
    a = draw(3, 10, 1)
    torch.manual_seed(456)
    torch.rand(100)
    assert torch.equal(a, draw(3, 10, 1))
    others = [draw(4, 10, 1), draw(3, 11, 1), draw(3, 10, 0), draw(10, 3, 1)]
    assert all(not torch.equal(a, o) for o in others)
    combos = {mix_seed(s, t, r) for s in range(10) for t in range(10) for r in range(3)}
    assert len(combos) == 300
    assert all(0 <= m < 2**63 for m in combos)
    assert mix_seed(1, 2) != mix_seed(2, 1)
