"""Feature-space metrics against closed forms and independent formulas: Fréchet distance of known
Gaussians, unbiased MMD², k-NN precision/recall on identical, disjoint and collapsed sets, the 1/n fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from training.eval import metrics


def _gaussians(d: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Two Gaussians with non-commuting covariances and their exact Fréchet distance (scipy's sqrtm)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = np.zeros(d), np.array([1.0, -0.5, 0.2, 0.3])[:d]
    exact = float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real))
    return m1, c1, m2, c2, exact


def _with_exact_moments(m: np.ndarray, c: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples whose sample mean is m and sample covariance (ddof=1) is c, exactly."""
    z = rng.normal(size=(n, len(m)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return m + z @ np.linalg.cholesky(c).T


def test_frechet_distance_equals_closed_form_on_exact_moments() -> None:
    m1, c1, m2, c2, exact = _gaussians()
    rng = np.random.default_rng(1)
    x, y = _with_exact_moments(m1, c1, 50, rng), _with_exact_moments(m2, c2, 80, rng)
    assert exact > 1.0
    assert metrics.frechet_distance(x, y) == pytest.approx(exact, rel=1e-10)
    assert metrics.frechet_distance(y, x) == pytest.approx(exact, rel=1e-10)
    assert abs(metrics.frechet_distance(x, x)) < 1e-10


def test_frechet_distance_of_large_samples_converges_to_closed_form() -> None:
    # With 100k samples per side the plug-in estimate's bias and spread are ~1e-3 of the value here.
    m1, c1, m2, c2, exact = _gaussians()
    rng = np.random.default_rng(2)
    x, y = rng.multivariate_normal(m1, c1, 100_000), rng.multivariate_normal(m2, c2, 100_000)
    assert metrics.frechet_distance(x, y) == pytest.approx(exact, rel=0.01)
    assert metrics.frechet_distance(torch.from_numpy(x).float(), y) == pytest.approx(exact, rel=0.01)


def test_frechet_distance_few_wide_samples_matches_eigvals_formula() -> None:
    # n < d takes the n×n Gram route; the reference is pytorch-fid/torchmetrics' Σ sqrt(eig(C_a C_b)).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 50)), rng.normal(size=(30, 50)) + 0.3
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr = np.sqrt(np.linalg.eigvals(ca @ cb).astype(complex)).real.sum()
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr
    assert metrics.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
    # C_x has rank 19 < 50: sqrt of its numerically-zero eigenvalue (~1e-15) leaves ~1e-8 of Tr C_x = 2·50.
    assert abs(metrics.frechet_distance(x, x)) < 1e-6 * np.trace(ca)


def test_mmd2_unbiased_matches_definition() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (u @ v / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted() -> None:
    rng = np.random.default_rng(5)
    a, b, shifted = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16)) + 0.3
    same, same_std = metrics.kid(a, b, subsets=50, subset_size=500, seed=0)
    diff, _ = metrics.kid(a, shifted, subsets=50, subset_size=500, seed=0)
    # Unbiased: the same-distribution mean is within 3 standard errors of 0 (measured: -4e-5 ± 0.0055/√50).
    assert abs(same) < 3 * same_std / np.sqrt(50)
    assert diff > 0.2  # measured 0.31: E‖shift‖² terms of the cubic kernel
    assert metrics.kid(a, shifted, 50, 500, seed=0) == metrics.kid(a, shifted, 50, 500, seed=0)


def test_precision_recall_identical_disjoint_and_collapsed() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    assert metrics.precision_recall(a, a) == (1.0, 1.0)  # every point lies in its own ball
    p, r = metrics.precision_recall(a, b)
    assert p > 0.7 and r > 0.7  # same distribution, finite samples (measured 0.78 / 0.80)
    assert metrics.precision_recall(a, b + 20.0) == (0.0, 0.0)
    # Mode collapse in 2-d: generated points cover only the x0 > 1 part (16% of the mass) of the real set.
    real, other = rng.normal(size=(3000, 2)), rng.normal(size=(20000, 2))
    p, r = metrics.precision_recall(real, other[other[:, 0] > 1][:1000])
    assert p > 0.95 and r < 0.3


def test_extrapolate_infinity_recovers_intercept() -> None:
    ns = metrics.infinity_ns(10_000)
    assert ns == list(range(1000, 3001, 200))
    assert metrics.infinity_ns(300) == list(range(100, 301, 20))
    values = [3.5 + 700.0 / n for n in ns]
    assert metrics.extrapolate_infinity(ns, values) == pytest.approx(3.5, abs=1e-9)
    with pytest.raises(ValueError, match="distinct"):
        metrics.extrapolate_infinity([1000, 1000], [1.0, 2.0])


def test_fd_infinity_removes_small_sample_bias() -> None:
    # Same distribution: FD at n is positive bias ~ d(d+1)/(2n); the intercept removes most of it (what
    # remains is the 20k real set's own bias, ~0.03).
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(20_000, 32)), rng.normal(size=(3000, 32))
    ns = metrics.infinity_ns(3000)
    inf, values = metrics.metric_at_infinity(metrics.frechet_distance, real, fake, ns, seed=0)
    assert values[0] > values[-1] > 0.1
    assert abs(inf) < 0.25 * values[-1]
