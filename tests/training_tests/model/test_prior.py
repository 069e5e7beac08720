"""Energy prior (docs/design.md §3, §4, §9): Gauss-Legendre on asymmetric domains, ITS samples against the
table's CDF and an independent dense numerical CDF, edge uniforms, the mixture, log-densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from training.config import PI0_DOMAINS, PriorConfig
from training.model.prior import U_EPS, EnergyPrior, gauss_legendre, inverse_cdf, knot_positions, log_pi0, sanitize_u

EPS = 1e-4
ASYMMETRIC = [(0.0, 4.0), (-0.1, 1.1), (2.0, 5.0)]
PI0S = ("uniform", "gaussian", "lognormal", "ebm")
BASES = ("rbf", "fft", "cheby")


def _prior(basis: str = "rbf", pi0: str = "gaussian", *, kind: str = "univariate", P: int = 3, Q: int = 2,
           G: int = 6, n_quad: int = 100, knots: str = "cell", seed: int = 1, scale: float = 1.0) -> EnergyPrior:
    """A small prior whose energies are random (seeded) and O(scale), so densities are far from pi0."""
    cfg = PriorConfig(kind=kind, P=P, Q=Q, basis=basis, grid_size=G, pi0=pi0, n_quad=n_quad, knots=knots)
    prior = EnergyPrior(cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    f = prior.f
    with torch.no_grad():
        coef = torch.randn(f.coef.shape, generator=gen)
        if basis == "fft":  # 1/m² decay (as at init, docs/design.md §2.2) keeps the energies resolvable by 100 nodes
            m = torch.arange(1, G + 2, dtype=torch.float32)
            coef = coef / torch.cat([m, m]) ** 2
        f.coef.copy_(scale * coef)
        f.w_sp.copy_(1.0 + 0.2 * torch.randn(f.w_sp.shape, generator=gen))
        f.w_base.copy_(scale * torch.randn(f.w_base.shape, generator=gen))
    return prior


def _pi0_pdf(kind: str, z: np.ndarray) -> np.ndarray:
    """pi0(z) + eps from scipy (float64), the integrand's reference-measure factor."""
    if kind == "ebm":
        return np.ones_like(z)
    if kind == "uniform":
        return ((z >= 0) & (z <= 1)).astype(np.float64) + EPS
    if kind == "gaussian":
        return stats.norm.pdf(z) + EPS
    return stats.lognorm.pdf(z, 1.0) + EPS


def _energy(prior: EnergyPrior, z: np.ndarray) -> np.ndarray:
    """f_{q,p}(z) for every (q, p) at the points z[M], as float64 [M, Q, P]."""
    zz = torch.tensor(z, dtype=torch.float32).view(-1, 1, 1).expand(-1, prior.Q, prior.P)
    with torch.no_grad():
        return prior.f(zz).double().numpy()


def _dense_cdf(prior: EnergyPrior, n: int = 40001) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent numerical CDF: trapezoid of exp(f)·(pi0 + eps) on a dense grid over [a, b].

    Returns (grid[M], cdf[M, Q, P], normalised density[M, Q, P])."""
    a, b = prior.cfg.domain
    z = np.linspace(a, b, n)
    f = _energy(prior, z)
    dens = np.exp(f - f.max(0, keepdims=True)) * _pi0_pdf(prior.cfg.pi0, z)[:, None, None]
    cum = np.concatenate([np.zeros((1, *dens.shape[1:])),
                          np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(z)[:, None, None], 0)])
    return z, cum / cum[-1], dens / cum[-1]


def _stratified(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()


# ----------------------------------------------------------------------------------------------
# Quadrature


@pytest.mark.parametrize("a,b", ASYMMETRIC)
@pytest.mark.parametrize("n", [3, 5, 8, 12])
def test_gauss_legendre_exact_for_polynomials_up_to_degree_2n_minus_1(a: float, b: float, n: int) -> None:
    x, w = gauss_legendre(n, a, b)
    x, w = x.double().numpy(), w.double().numpy()
    for k in range(2 * n):
        exact = (b ** (k + 1) - a ** (k + 1)) / (k + 1)
        assert (w * x**k).sum() == pytest.approx(exact, rel=1e-5), f"x^{k}"


@pytest.mark.parametrize("a,b", ASYMMETRIC)
def test_gauss_legendre_nodes_inside_domain_and_centred(a: float, b: float) -> None:
    # The reference maps x = b·ξ: on [0, 4] its nodes spread over [-4, 4] and centre on 0.
    x, w = gauss_legendre(40, a, b)
    assert x.dtype == w.dtype == torch.float32
    assert (x > a).all() and (x < b).all()
    assert (torch.diff(x) > 0).all(), "nodes must be ascending"
    assert (w > 0).all()
    assert float(w.double().sum()) == pytest.approx(b - a, rel=1e-6)
    assert float((w.double() * x.double()).sum() / w.double().sum()) == pytest.approx(0.5 * (a + b), rel=1e-6)
    # Symmetric about the midpoint, as Gauss-Legendre is.
    torch.testing.assert_close(x + x.flip(0), torch.full_like(x, a + b), atol=1e-6, rtol=0)


def test_gauss_legendre_integrates_lognormal_on_0_4() -> None:
    x, w = gauss_legendre(100, 0.0, 4.0)
    approx = float((w.double() * torch.from_numpy(stats.lognorm.pdf(x.double().numpy(), 1.0))).sum())
    assert approx == pytest.approx(stats.lognorm.cdf(4.0, 1.0), rel=1e-6)


@pytest.mark.parametrize("a,b", [(2.0, 5.0), (-0.1, 1.1)])
def test_gauss_legendre_integrates_gaussian_pdf_on_shifted_domain(a: float, b: float) -> None:
    x, w = gauss_legendre(30, a, b)
    approx = float((w.double() * torch.from_numpy(stats.norm.pdf(x.double().numpy()))).sum())
    assert approx == pytest.approx(stats.norm.cdf(b) - stats.norm.cdf(a), rel=1e-6)


def test_knot_positions_conventions() -> None:
    a, b = 0.0, 4.0
    x, _ = gauss_legendre(10, a, b)
    cell = knot_positions(x, a, b, "cell")
    assert cell.shape == (11,)
    assert float(cell[0]) == a and float(cell[-1]) == b
    torch.testing.assert_close(cell[1:-1], 0.5 * (x[1:] + x[:-1]))
    # Each node sits inside its own cell [t_{k-1}, t_k].
    assert ((cell[:-1] < x) & (x < cell[1:])).all()
    ref = knot_positions(x, a, b, "reference")
    torch.testing.assert_close(ref[:-1], x)
    assert float(ref[-1]) == float(x[-1])


# ----------------------------------------------------------------------------------------------
# Reference measures


def test_log_pi0_gaussian_matches_scipy() -> None:
    z = np.linspace(-6.0, 6.0, 241)
    got = log_pi0(torch.tensor(z, dtype=torch.float32), "gaussian", EPS).double().numpy()
    np.testing.assert_allclose(got, np.log(stats.norm.pdf(z) + EPS), atol=2e-6, rtol=1e-6)


def test_log_pi0_lognormal_matches_scipy_and_floors_nonpositive() -> None:
    z = np.concatenate([np.geomspace(1e-3, 20.0, 200)])
    got = log_pi0(torch.tensor(z, dtype=torch.float32), "lognormal", EPS).double().numpy()
    z32 = z.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got, np.log(stats.lognorm.pdf(z32, 1.0) + EPS), atol=2e-6, rtol=1e-6)
    neg = log_pi0(torch.tensor([0.0, -1e-6, -0.5, -3.0]), "lognormal", EPS)
    torch.testing.assert_close(neg, torch.full((4,), math.log(EPS)), atol=1e-6, rtol=0)
    assert torch.isfinite(neg).all()


def test_log_pi0_uniform_and_ebm() -> None:
    z = torch.tensor([-0.1, -1e-4, 0.0, 0.3, 1.0, 1.0001, 5.0])
    got = log_pi0(z, "uniform", EPS)
    inside = torch.tensor([False, False, True, True, True, False, False])
    want = torch.where(inside, torch.tensor(math.log1p(EPS)), torch.tensor(math.log(EPS)))
    torch.testing.assert_close(got, want)
    assert torch.equal(log_pi0(z, "ebm", EPS), torch.zeros_like(z))
    with pytest.raises(ValueError):
        log_pi0(z, "cauchy", EPS)


# ----------------------------------------------------------------------------------------------
# Inverse-transform sampling against CDFs


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("pi0", PI0S)
def test_its_matches_table_cdf_and_dense_numerical_cdf(basis: str, pi0: str) -> None:
    prior = _prior(basis, pi0)
    a, b = prior.cfg.domain
    n = 4000
    u = _stratified(n)
    z = prior.sample(u[:, None].expand(n, prior.P)).double().numpy()  # [n, Q, P]
    assert np.isfinite(z).all() and (z >= a).all() and (z <= b).all()

    # (1) The table's piecewise-linear CDF, evaluated independently by np.interp, maps z back to u:
    #     the stratified grid is then within 1/(2n) of it in KS distance.
    cdf = prior.cdf_table().detach().double().numpy()
    knots = prior.knots.double().numpy()
    u64 = u.double().numpy()
    for q in range(prior.Q):
        for p in range(prior.P):
            back = np.interp(z[:, q, p], knots, cdf[q, p])
            assert np.abs(back - u64).max() < 2e-6, (q, p)

    # (2) Against the dense numerical CDF of exp(f)·pi0: KS ≤ a share of (largest cell × largest
    #     density), the resolution of a 100-node rule. pi0 = uniform jumps inside [a, b]: a jump
    #     costs up to one cell of mass, smooth measures ~O(h²) (observed ≤ 0.02·h·d).
    grid, dense, dens = _dense_cdf(prior)
    h = float(torch.diff(prior.knots).max())
    for q in range(prior.Q):
        for p in range(prior.P):
            ks = np.abs(np.interp(z[:, q, p], grid, dense[:, q, p]) - u64).max() + 0.5 / n
            share = 0.5 if pi0 == "uniform" else 0.05
            assert ks < share * h * dens[:, q, p].max() + 1.0 / n, (q, p, ks)


@pytest.mark.parametrize("pi0", PI0S)
def test_its_random_uniforms_pass_ks_test(pi0: str) -> None:
    prior = _prior("rbf", pi0, seed=7)
    n = 3000
    u = torch.rand(n, prior.P, generator=torch.Generator().manual_seed(11))
    z = prior.sample(u).double().numpy()
    grid, dense, dens = _dense_cdf(prior)
    h = float(torch.diff(prior.knots).max())
    crit = 1.63 / math.sqrt(n)  # Kolmogorov 1% critical value
    for q in range(prior.Q):
        for p in range(prior.P):
            cdf = lambda x, q=q, p=p: np.interp(x, grid, dense[:, q, p])  # noqa: E731
            ks = stats.kstest(z[:, q, p], cdf).statistic
            share = 0.5 if pi0 == "uniform" else 0.05
            assert ks < crit + share * h * dens[:, q, p].max(), (q, p, ks)


@pytest.mark.parametrize("knots", ["cell", "reference"])
def test_reference_knots_sample_dense_cdf_within_one_cell(knots: str) -> None:
    # The reference convention shifts each node's mass by up to one cell (and collapses the last
    # node onto x_N): still a valid sampler, within one cell of mass of the true CDF.
    prior = _prior("fft", "gaussian", knots=knots)
    n = 2000
    u = _stratified(n)
    z = prior.sample(u[:, None].expand(n, prior.P)).double().numpy()
    grid, dense, dens = _dense_cdf(prior)
    h = float(torch.diff(prior.knots).max())
    for q in range(prior.Q):
        for p in range(prior.P):
            zs = z[:, q, p]
            assert np.isfinite(zs).all() and (np.diff(zs) >= 0).all()
            ks = np.abs(np.interp(zs, grid, dense[:, q, p]) - u.double().numpy()).max()
            assert ks < h * dens[:, q, p].max() + 1.0 / n


def test_cell_knots_reach_both_ends_reference_knots_do_not() -> None:
    # ebm with zero energy = uniform density on [a, b]: the cell convention spans all of [a, b].
    u = torch.tensor([[U_EPS], [1 - U_EPS]])
    for knots in ("cell", "reference"):
        prior = _prior("rbf", "ebm", P=1, Q=1, knots=knots, scale=0.0)
        a, b = prior.cfg.domain
        z = prior.sample(u).flatten()
        x = prior.nodes
        if knots == "cell":
            assert float(z[0]) - a < 1e-3 * (b - a)
            assert b - float(z[1]) < 1e-3 * (b - a)
            assert float(z[0]) < float(x[0]) and float(z[1]) > float(x[-1])
        else:
            assert float(z[0]) >= float(x[0]) and float(z[1]) <= float(x[-1])


@pytest.mark.parametrize("kind", ["univariate", "mixture"])
@pytest.mark.parametrize("knots", ["cell", "reference"])
def test_edge_uniforms_finite_inside_domain_and_nan_is_half(kind: str, knots: str) -> None:
    prior = _prior("rbf", "lognormal", kind=kind, knots=knots)
    a, b = prior.cfg.domain
    edge = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9, float("nan"), -3.0, 7.0, 0.5])
    u = edge[:, None].expand(-1, prior.u_dim).contiguous()
    z = prior.sample(u)
    assert torch.isfinite(z).all()
    assert (z >= a).all() and (z <= b).all()
    assert torch.equal(z[4], z[7]), "NaN must map exactly like 0.5"
    assert torch.equal(z[0], z[2]) and torch.equal(z[0], z[5]), "below the clamp maps like 0"
    assert torch.equal(z[1], z[3]) and torch.equal(z[1], z[6]), "above the clamp maps like 1"


def test_sanitize_u() -> None:
    u = torch.tensor([float("nan"), -1.0, 0.0, 0.25, 1.0, 2.0])
    torch.testing.assert_close(sanitize_u(u), torch.tensor([0.5, U_EPS, U_EPS, 0.25, 1 - U_EPS, 1 - U_EPS]))


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("knots", ["cell", "reference"])
def test_samples_monotone_in_u(basis: str, knots: str) -> None:
    prior = _prior(basis, "uniform", knots=knots, seed=3, scale=3.0)
    u = torch.cat([torch.tensor([0.0, 1e-9, 1e-7, U_EPS]), torch.linspace(0, 1, 3001), torch.tensor([1 - 1e-9, 1.0])])
    u, _ = torch.sort(u)
    z = prior.sample(u[:, None].expand(-1, prior.P))
    assert torch.isfinite(z).all()
    assert (torch.diff(z, dim=0) >= 0).all()
    a, b = prior.cfg.domain
    assert float(z.min()) >= a and float(z.max()) <= b


def test_inverse_cdf_zero_mass_cell_returns_left_knot() -> None:
    cdf = torch.tensor([0.0, 0.5, 0.5, 1.0])
    knots = torch.tensor([0.0, 1.0, 2.0, 3.0])
    z = inverse_cdf(cdf, knots, torch.tensor([0.25, 0.5, 0.5 + 1e-6, 0.75]))
    torch.testing.assert_close(z, torch.tensor([0.5, 1.0, 2.0, 2.5]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Mixture


def _mixture_with_alpha(alpha: torch.Tensor, **kw) -> EnergyPrior:
    prior = _prior(kind="mixture", P=alpha.shape[1], Q=alpha.shape[0], **kw)
    prior.log_alpha.copy_(alpha.log())
    prior.cum_alpha.copy_(torch.cumsum(alpha, -1))
    return prior


def _component_of(prior: EnergyPrior, z: torch.Tensor, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Which component's CDF maps z back to its ITS uniform w: (argmin index, residual) per (b, q)."""
    cdf = prior.cdf_table().detach().double().numpy()
    knots = prior.knots.double().numpy()
    zz, ww = z.double().numpy(), w.double().numpy()
    err = np.stack([np.stack([np.abs(np.interp(zz[:, q], knots, cdf[q, p]) - ww[:, q]) for p in range(prior.P)], -1)
                    for q in range(prior.Q)], 1)  # [B, Q, P]
    return err.argmin(-1), err.min(-1)


def test_mixture_component_frequencies_match_alpha() -> None:
    alpha = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    prior = _mixture_with_alpha(alpha, pi0="ebm", scale=2.0)
    n = 20000
    u = torch.rand(n, prior.u_dim, generator=torch.Generator().manual_seed(5))
    z = prior.sample(u)
    assert z.shape == (n, prior.Q)
    comp, resid = _component_of(prior, z, u[:, prior.Q:])
    assert resid.max() < 2e-6, "every sample must come from one component's CDF"
    crit = stats.chi2.ppf(0.999, prior.P - 1)
    for q in range(prior.Q):
        counts = np.bincount(comp[:, q], minlength=prior.P)
        chi2 = ((counts - n * alpha[q].numpy()) ** 2 / (n * alpha[q].numpy())).sum()
        assert chi2 < crit, (q, counts)


def test_mixture_uniform_alpha_from_config() -> None:
    prior = _prior(kind="mixture", P=4, Q=2, pi0="gaussian", scale=2.0)
    torch.testing.assert_close(prior.log_alpha.exp(), torch.full((2, 4), 0.25))
    n = 4000
    v = _stratified(n)  # stratified selection uniforms: frequencies are α to within 1/n
    w = torch.rand(n, prior.Q, generator=torch.Generator().manual_seed(2))
    z = prior.sample(torch.cat([v[:, None].expand(n, prior.Q), w], 1))
    comp, resid = _component_of(prior, z, w)
    assert resid.max() < 2e-6
    for q in range(prior.Q):
        freq = np.bincount(comp[:, q], minlength=prior.P) / n
        np.testing.assert_allclose(freq, 0.25, atol=2.0 / n)


def test_mixture_fixed_selection_follows_that_component() -> None:
    alpha = torch.tensor([[0.2, 0.5, 0.3]])
    prior = _mixture_with_alpha(alpha, pi0="gaussian", scale=2.0)
    cum = torch.cumsum(alpha[0], 0)
    n = 1000
    w = _stratified(n)
    knots = prior.knots.double().numpy()
    cdf = prior.cdf_table().detach().double().numpy()
    previous = None
    for p in range(3):
        v = float(cum[p] - 0.5 * alpha[0, p])  # middle of component p's interval
        z = prior.sample(torch.stack([torch.full((n,), v), w], 1))[:, 0]
        assert (torch.diff(z) >= 0).all()
        np.testing.assert_allclose(np.interp(z.double().numpy(), knots, cdf[0, p]), w.double().numpy(), atol=2e-6)
        if previous is not None:
            assert not torch.allclose(z, previous), "components must differ for this test to mean anything"
        previous = z


# ----------------------------------------------------------------------------------------------
# log_prob and the normaliser


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float((0.5 * (y[1:] + y[:-1]) * np.diff(x)).sum())


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("pi0", ["gaussian", "lognormal", "ebm"])
def test_univariate_normalized_log_prob_integrates_to_one(basis: str, pi0: str) -> None:
    prior = _prior(basis, pi0, P=1, Q=1, seed=4)
    a, b = prior.cfg.domain
    z = np.linspace(a, b, 20001)
    with torch.no_grad():
        lp = prior.log_prob(torch.tensor(z, dtype=torch.float32).view(-1, 1, 1), normalized=True)
    assert _trapezoid(np.exp(lp.double().numpy()), z) == pytest.approx(1.0, abs=2e-4)


def test_univariate_log_prob_sums_over_q_and_p() -> None:
    prior = _prior("rbf", "gaussian", P=3, Q=2)
    z = prior.sample(torch.rand(5, prior.P, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        f = prior.f(z).double()
        want = (f + torch.log(torch.from_numpy(stats.norm.pdf(z.double().numpy())) + EPS)).sum((-1, -2))
        got = prior.log_prob(z)
        logz = prior.log_normalizer().double()
        got_norm = prior.log_prob(z, normalized=True)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(got_norm.double(), want - logz.sum(), atol=1e-4, rtol=1e-6)


def _quadrature_log_z(prior: EnergyPrior) -> np.ndarray:
    """log Z_{q,p} from numpy's own Gauss-Legendre rule in float64, [Q, P]."""
    a, b = prior.cfg.domain
    xi, om = np.polynomial.legendre.leggauss(prior.cfg.n_quad)
    x, w = 0.5 * (a + b) + 0.5 * (b - a) * xi, 0.5 * (b - a) * om
    logm = np.log(w)[:, None, None] + _energy(prior, x) + np.log(_pi0_pdf(prior.cfg.pi0, x))[:, None, None]
    top = logm.max(0)
    return top + np.log(np.exp(logm - top).sum(0))


@pytest.mark.parametrize("pi0", PI0S)
def test_log_normalizer_matches_float64_quadrature(pi0: str) -> None:
    prior = _prior("cheby", pi0)
    with torch.no_grad():
        got = prior.log_normalizer().double().numpy()
    np.testing.assert_allclose(got, _quadrature_log_z(prior), atol=5e-5)


def test_mixture_log_prob_equals_brute_force_sum() -> None:
    alpha = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    prior = _mixture_with_alpha(alpha, pi0="gaussian", basis="fft", scale=2.0)
    z = prior.sample(torch.rand(6, prior.u_dim, generator=torch.Generator().manual_seed(9)))
    z[0, 0] = -1.19  # include the domain ends
    z[1, 1] = 1.19
    logz = _quadrature_log_z(prior)
    want = np.zeros(z.shape[0])
    for i in range(z.shape[0]):
        for q in range(prior.Q):
            zq = float(z[i, q])
            f = _energy(prior, np.array([zq]))[0, q]
            pi0 = stats.norm.pdf(zq) + EPS
            mix = sum(float(alpha[q, p]) * math.exp(f[p] - logz[q, p]) * pi0 for p in range(prior.P))
            want[i] += math.log(mix)
    with torch.no_grad():
        got = prior.log_prob(z).double().numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_mixture_log_prob_integrates_to_one() -> None:
    alpha = torch.tensor([[0.7, 0.2, 0.1]])
    prior = _mixture_with_alpha(alpha, pi0="lognormal", scale=2.0)
    a, b = prior.cfg.domain
    z = np.linspace(a, b, 20001)
    with torch.no_grad():
        lp = prior.log_prob(torch.tensor(z, dtype=torch.float32).view(-1, 1))
    assert _trapezoid(np.exp(lp.double().numpy()), z) == pytest.approx(1.0, abs=2e-4)


@pytest.mark.parametrize("kind", ["univariate", "mixture"])
def test_large_energies_stay_finite_in_log_space(kind: str) -> None:
    # |f| in the hundreds: exp(f) overflows float32 above ~88.7 (design.md §9); all must stay finite, right.
    prior = _prior("rbf", "gaussian", kind=kind, P=2, Q=2, scale=1.0)
    with torch.no_grad():
        prior.f.w_base.copy_(torch.tensor([[250.0, -200.0], [180.0, 120.0]]))
        prior.f.coef.mul_(50.0)
    f_nodes = _energy(prior, prior.nodes.double().numpy())
    assert f_nodes.max() > 100.0 and f_nodes.min() < -100.0
    logz = prior.log_normalizer()
    assert torch.isfinite(logz).all()
    np.testing.assert_allclose(logz.detach().double().numpy(), _quadrature_log_z(prior), rtol=1e-6)
    cdf = prior.cdf_table()
    assert torch.isfinite(cdf).all()
    assert (torch.diff(cdf, dim=-1) >= 0).all()
    torch.testing.assert_close(cdf[..., -1], torch.ones(2, 2))
    z = prior.sample(torch.rand(64, prior.u_dim, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(z).all()
    if kind == "mixture":
        # Across the whole domain, where every component's density underflows float32 somewhere.
        a, b = prior.cfg.domain
        grid = np.linspace(a, b, 201)
        with torch.no_grad():
            got = prior.log_prob(torch.tensor(grid, dtype=torch.float32).view(-1, 1).expand(-1, 2)).double().numpy()
        comp = np.log(0.5) + _energy(prior, grid) - _quadrature_log_z(prior)  # [M, Q, P]
        top = comp.max(-1)
        want = (top + np.log(np.exp(comp - top[..., None]).sum(-1)) + np.log(stats.norm.pdf(grid) + EPS)[:, None])
        assert (top < -104).any(), "some z must have all components below float32's exp range"
        np.testing.assert_allclose(got, want.sum(-1), rtol=1e-5, atol=1e-3)
    lp = prior.log_prob(z, normalized=True)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in prior.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# Domain updates


def test_set_domain_recomputes_nodes_weights_and_knots() -> None:
    prior = _prior("fft", "ebm")
    old_nodes, old_w = prior.nodes.clone(), prior.log_w.clone()
    a2, b2 = -3.0, 0.5
    prior.set_domain(a2, b2)
    x, w = gauss_legendre(prior.cfg.n_quad, a2, b2)
    assert not torch.allclose(prior.nodes, old_nodes) and not torch.allclose(prior.log_w, old_w)
    torch.testing.assert_close(prior.nodes, x)
    torch.testing.assert_close(prior.log_w, w.log())
    torch.testing.assert_close(prior.knots, knot_positions(x, a2, b2, "cell"))
    torch.testing.assert_close(prior.domain, torch.tensor([a2, b2]))
    z = prior.sample(torch.rand(500, prior.P, generator=torch.Generator().manual_seed(0)))
    assert float(z.min()) >= a2 and float(z.max()) <= b2
    assert float(z.min()) < -1.2, "samples must use the new, wider lower end"


def test_domains_from_config() -> None:
    assert PriorConfig(pi0="lognormal").domain == PI0_DOMAINS["lognormal"] == (0.0, 4.0)
    assert PriorConfig(pi0="uniform").domain == (-0.1, 1.1)
    assert PriorConfig(pi0="ebm", ebm_domain=(-1.0, 1.0)).domain == (-1.0, 1.0)
    prior = _prior("rbf", "lognormal")
    assert float(prior.nodes.min()) > 0.0 and float(prior.nodes.max()) < 4.0


def test_density_on_nodes_is_normalised_with_quadrature_weights() -> None:
    prior = _prior("fft", "lognormal", scale=2.0)
    nodes, dens, pi0 = prior.density_on_nodes()
    w = prior.log_w.exp().double()
    assert torch.equal(nodes, prior.nodes) and dens.shape == (prior.Q, prior.P, prior.cfg.n_quad)
    torch.testing.assert_close((dens.double() * w).sum(-1), torch.ones(prior.Q, prior.P, dtype=torch.float64))
    assert float((pi0.double() * w).sum()) == pytest.approx(1.0, abs=1e-5)
    # Normalised pi0 on [0, 4] is the lognormal pdf (+eps) divided by its mass there.
    want = (stats.lognorm.pdf(nodes.double().numpy(), 1.0) + EPS) / (stats.lognorm.cdf(4.0, 1.0) + 4 * EPS)
    np.testing.assert_allclose(pi0.double().numpy(), want, rtol=1e-4, atol=1e-6)


def test_eager_binary_search_matches_compare_and_count() -> None:
    # Eager ITS uses searchsorted, the definition is compare-and-count: the same index everywhere,
    # including ties (zero-mass cells) and u exactly on a CDF value, in both table layouts.
    from training.model.prior import _bucket, count_below

    g = torch.Generator().manual_seed(3)
    m = torch.rand(4, 3, 12, generator=g)
    m[..., 2:5] = 0.0  # zero-mass cells: repeated CDF values
    c = torch.cumsum(m, -1)
    cdf = torch.cat([torch.zeros(4, 3, 1), c / c[..., -1:]], -1)  # [Q, P, N+1]
    u = torch.rand(7, 4, 3, generator=g)
    u[0] = cdf[..., 3]  # on a tie
    u[1] = cdf[..., 8]
    assert torch.equal(_bucket(cdf, u), count_below(cdf, u))
    rows = cdf[:, 0][torch.tensor([0, 1, 2, 3, 3, 2, 1])]  # one row per value: [B, N+1]
    v = u[:, 0, 0]
    assert torch.equal(_bucket(rows, v), count_below(rows, v))


def _hard_tables(g: torch.Generator) -> torch.Tensor:
    """CDF rows [R, N+1] that stress a bucket table: zero-mass runs (ties), a spike holding almost all the
    mass (dozens of values inside one bucket, in both tails), values on bucket edges and below U_EPS."""
    m = torch.rand(6, 40, generator=g)
    m[0, 5:15] = 0.0  # a run of ties
    m[1] = 1e-5
    m[1, 20] = 1.0  # a spike: the other 39 values crowd within 2e-4 of 0 and of 1
    m[2, :10] = 1e-12  # a left tail below U_EPS
    m[3] = 1.0 / 40  # uniform: values k/40, some exactly on edges m/M
    m[4, ::2] = 0.0
    c = torch.cumsum(m, -1)
    return torch.cat([torch.zeros(6, 1), c / c[:, -1:]], -1)


def _edge_uniforms(table: torch.Tensor, n_buckets: int, g: torch.Generator, n: int) -> torch.Tensor:
    """Random u plus every table value, every bucket edge m/M and the ends of the sanitised range."""
    special = torch.cat([table.flatten(), torch.arange(n_buckets + 1) / n_buckets,
                         torch.tensor([U_EPS, 1 - U_EPS, 0.5])])
    return sanitize_u(torch.cat([torch.rand(n, generator=g), special]))


def test_bucket_lookup_gives_the_binary_search_index_bit_for_bit() -> None:
    # The served graph's O(1) lookup (bucket table + a fixed window of compares) must count exactly what
    # searchsorted and compare-and-count do, on any non-decreasing table: ties, spikes, tails below U_EPS,
    # u on table values and on bucket edges; with the window forced small (many buckets, up to the cap,
    # where the window then grows to stay exact) and forced few (a wide window).
    from training.model.prior import BucketLookup, count_below

    g = torch.Generator().manual_seed(11)
    table = _hard_tables(g)
    knots = torch.linspace(-1.2, 1.2, table.shape[1])
    for max_window, max_buckets in [(1, 1 << 12), (4, 1 << 20), (64, 16)]:
        lookup = BucketLookup(table, knots, max_window=max_window, max_buckets=max_buckets)
        assert lookup.n_buckets & (lookup.n_buckets - 1) == 0 and 16 <= lookup.n_buckets <= max(16, max_buckets)
        u = _edge_uniforms(table, lookup.n_buckets, g, 3000)
        row = torch.randint(0, table.shape[0], u.shape, generator=g)
        want = count_below(table[row], u)
        assert torch.equal(lookup.count(row, u), want)
        torch.testing.assert_close(lookup.invert(row, u), inverse_cdf(table[row], knots, u), rtol=0, atol=0)
    # the spike row: ~20 values within one bucket of 1/4096 at each end, so at the cap the window widens
    assert BucketLookup(table[1:2], knots, max_window=1, max_buckets=1 << 12).window > 1
    assert BucketLookup(table[3:4], knots, max_window=1).window == 1


def test_bucket_lookup_refuses_a_table_that_is_not_a_cdf() -> None:
    # the guard-free interpolation of BucketLookup.invert relies on C_0 < U_EPS and C_N >= 1 - U_EPS
    from training.errors import KaemError
    from training.model.prior import BucketLookup, PriorTableError

    knots = torch.linspace(-1.0, 1.0, 5)
    good = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]])
    assert BucketLookup(good, knots).window >= 1
    for bad in (good * 0.5, good + 0.1, good.flip(-1), torch.full_like(good, float("nan"))):
        with pytest.raises(PriorTableError, match="not a CDF"):
            BucketLookup(bad, knots)
    assert issubclass(PriorTableError, KaemError)


@pytest.mark.parametrize("kind", ["univariate", "folded", "independent", "mixture"])
def test_prior_sample_with_the_bucket_lookup_equals_eager_sampling(kind: str) -> None:
    from training.model.prior import BucketLookup

    prior = _prior("rbf", "gaussian", kind=kind, P=3, Q=4, seed=4, scale=3.0)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(256, prior.u_dim, generator=g)
    u[0], u[1], u[2] = 0.0, 1.0, float("nan")
    with torch.no_grad():
        cdf = prior.cdf_table()
        lookup = BucketLookup(cdf, prior.knots)
        u[3] = cdf.flatten()[: prior.u_dim]  # on table values
        assert torch.equal(prior.sample(u, lookup=lookup), prior.sample(u, cdf))


def test_row_indexed_inversion_equals_gathered_rows_bit_for_bit() -> None:
    # The mixture's eager path searches all rows at once (offset by 2r in float64); the graph gathers the
    # chosen rows and counts. Same z to the bit, ties, CDF values and both ends included.
    from training.model.prior import inverse_cdf_rows

    g = torch.Generator().manual_seed(5)
    m = torch.rand(12, 30, generator=g)
    m[:, 4:9] = 0.0
    c = torch.cumsum(m, -1)
    table = torch.cat([torch.zeros(12, 1), c / c[:, -1:]], -1)  # [rows, N+1]
    knots = torch.linspace(-1.2, 1.2, 31)
    row = torch.randint(0, 12, (200, 5), generator=g)
    u = torch.rand(200, 5, generator=g)
    u[0] = table[row[0], 6]  # exactly on a tie
    u[1] = table[row[1], 17]
    u[2], u[3] = U_EPS, 1 - U_EPS
    torch.testing.assert_close(inverse_cdf_rows(table, knots, row, u), inverse_cdf(table[row], knots, u), rtol=0,
                               atol=0)
    prior = _prior("rbf", "gaussian", kind="mixture", P=3, Q=4, seed=2)
    uu = torch.rand(64, prior.u_dim, generator=g)
    with torch.no_grad():
        cdf = prior.cdf_table()
        rows = cdf.reshape(prior.Q * prior.P, -1)
        v, w = uu[:, : prior.Q], sanitize_u(uu[:, prior.Q :])
        from training.model.prior import count_below

        pick = torch.arange(prior.Q) * prior.P + torch.clamp(count_below(prior.cum_alpha, v), 0, prior.P - 1)
        assert torch.equal(prior.sample(uu, cdf), inverse_cdf(rows[pick], prior.knots, w))


# ----------------------------------------------------------------------------------------------
# KART layouts with distinct inner inputs: "folded" (shifted tent folds of the shared u_p) and
# "independent" (one uniform per (q, p))


def test_tent_fold_is_continuous_periodic_and_keeps_uniforms_uniform() -> None:
    from training.model.prior import fold_shifts, tent_fold

    v = torch.linspace(-2, 3, 50001, dtype=torch.float64)
    t = tent_fold(v)
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(torch.diff(t).abs().max()) <= 2 * float(torch.diff(v).max()) + 1e-12  # Lipschitz 2: no jumps
    torch.testing.assert_close(tent_fold(v + 1), t)
    u = _stratified(20000).double()
    for c in (0.0, 0.3, 0.618):
        assert stats.kstest(tent_fold(u + c).numpy(), "uniform").statistic < 1e-3
    c = fold_shifts(5, 4)
    assert c.shape == (5, 4) and float(c[0].abs().max()) == 0.0 and float(c.min()) >= 0 and float(c.max()) < 1
    # Between any two q the phase difference differs across p: a difference shared by every p would turn
    # the whole vector (u_1..u_P) by one phase, and h would stay two-dimensional.
    for q in range(5):
        for r in range(q + 1, 5):
            assert len({round(float(x), 6) for x in torch.frac(c[q] - c[r] + 1)}) == 4, (q, r)


@pytest.mark.parametrize("kind", ["folded", "independent"])
def test_distinct_input_layouts_are_exact_draws_from_each_pi_qp(kind: str) -> None:
    prior = _prior("rbf", "gaussian", kind=kind, seed=7)
    n = 3000
    assert prior.u_dim == (prior.P if kind == "folded" else prior.Q * prior.P)
    u = torch.rand(n, prior.u_dim, generator=torch.Generator().manual_seed(12))
    z = prior.sample(u)
    assert z.shape == (n, prior.Q, prior.P)
    torch.testing.assert_close(prior.latent(z), z.sum(-1))
    z = z.double().numpy()
    grid, dense, dens = _dense_cdf(prior)
    h = float(torch.diff(prior.knots).max())
    for q in range(prior.Q):
        for p in range(prior.P):
            cdf = lambda x, q=q, p=p: np.interp(x, grid, dense[:, q, p])  # noqa: E731
            assert stats.kstest(z[:, q, p], cdf).statistic < 1.63 / math.sqrt(n) + 0.05 * h * dens[:, q, p].max()


def test_distinct_input_layouts_decorrelate_the_latent() -> None:
    # Same energies for every q: the paper's layout gives h_q identical over q, the others do not.
    n = 4000
    corr = {}
    for kind in ("univariate", "folded", "independent"):
        prior = _prior("rbf", "gaussian", kind=kind, P=4, Q=6, seed=3)
        with torch.no_grad():
            for t in (prior.f.w_base, prior.f.w_sp, prior.f.coef):
                t.copy_(t[:1].clone().expand_as(t))
        h = prior.latent(prior.sample(torch.rand(n, prior.u_dim, generator=torch.Generator().manual_seed(4))))
        c = np.corrcoef(h.T.double().numpy())
        corr[kind] = float(np.abs(c[~np.eye(6, dtype=bool)]).max())
    assert corr["univariate"] > 0.999
    assert corr["independent"] < 0.1 and corr["folded"] < 0.8, corr


@pytest.mark.parametrize("kind", ["univariate", "independent", "folded", "mixture"])
@pytest.mark.parametrize("normalized", [False, True])
def test_log_prob_sums_equal_the_weighted_per_sample_log_densities(kind: str, normalized: bool) -> None:
    """The loss's prior terms Σ_n a_nc log π(z_n) (EnergyPrior.log_prob_sums: the KART layouts sum the basis over
    the samples first) have the value and the parameter gradients of the per-sample log π weighted and summed."""
    prior = _prior(kind=kind).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = prior.sample(torch.rand(12, prior.u_dim, generator=gen, dtype=torch.float64))
    a = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda: prior.log_prob_sums(z, a, normalized),
               lambda: a.T @ prior.log_prob(z, normalized)):
        out = fn()
        params = [p for p in prior.parameters() if p.requires_grad]
        results.append((out.detach(), torch.autograd.grad(out @ torch.tensor([1.0, -0.7], dtype=torch.float64),
                                                          params, allow_unused=True)))
    (v_fast, g_fast), (v_plain, g_plain) = results
    assert v_fast.shape == (2,)
    torch.testing.assert_close(v_fast, v_plain)
    for a_, b_ in zip(g_fast, g_plain, strict=True):
        assert (a_ is None) == (b_ is None)
        if a_ is not None:
            torch.testing.assert_close(a_, b_)
