"""Posterior samplers on targets with known answers (docs/design.md §5.4-5.5): ULA and MALA on Gaussians, the
autoMALA step-size search and reversibility check, global swaps, and a conjugate linear-Gaussian
latent model where log p(x) and every tempered posterior are known in closed form."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from training.config import PosteriorConfig
from training.mcmc import samplers
from training.mcmc.samplers import MALASettings

MU = torch.tensor([1.0, -0.5])
SD = torch.tensor([0.7, 1.2])


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_target(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((z - MU) / SD) ** 2).sum(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _settings(**changes: object) -> MALASettings:
    """MALA settings of the default posterior config with ``changes`` (the config holds the one set of defaults)."""
    return MALASettings.of(replace(PosteriorConfig(), **changes))


def test_ula_recovers_gaussian_mean_and_variance() -> None:
    # 8000 chains, η = 0.01, 1000 steps (≈7 relaxation times of the wider coordinate, τ = s²/η = 144).
    # ULA's stationary variance on N(μ, s²) is s² / (1 − η/(2s²)): +1.0% and +0.35% here.
    # Tolerances: mean 4 standard errors (4·s/√8000 ≤ 0.054); variance 1% bias + 4·√(2/8000) = 7.3%.
    eta, n = 0.01, 8000
    z = samplers.ula(gaussian_target, torch.randn(n, 2, generator=_gen(0)), eta, 1000, _gen(1))
    assert torch.allclose(z.mean(0), MU, atol=0.054)
    expected_var = SD**2 / (1 - eta / (2 * SD**2))
    assert torch.allclose(z.var(0) / expected_var, torch.ones(2), atol=0.063)


def test_mala_recovers_gaussian_where_ula_at_the_same_step_is_biased() -> None:
    # A large step: ULA at η = 0.3 inflates the variance of the s = 0.7 coordinate by 1/(1 − 0.306)
    # = 1.44×; MALA's MH correction removes that bias whatever step the search picks.
    n = 3000
    z0 = torch.randn(n, 2, generator=_gen(2))
    z_ula = samplers.ula(gaussian_target, z0, 0.3, 300, _gen(3))
    assert z_ula.var(0)[0] / SD[0] ** 2 > 1.3
    res = samplers.mala(gaussian_target, z0, torch.full((n,), 0.3), _gen(3), _settings(langevin_steps=150))
    assert torch.allclose(res.z.mean(0), MU, atol=4 * 1.2 / math.sqrt(n) * 2)  # 2× for chain autocorrelation
    assert torch.allclose(res.z.var(0) / SD**2, torch.ones(2), atol=0.1)
    # Acceptance with uniformly drawn (a, b) bands lands well inside (0, 1): measured 0.77.
    rate = float(res.accept_rate.mean())
    assert 0.5 < rate < 0.95
    assert res.reversible_rate > 0.5 and res.search_evals >= 2
    # Carry-over: the mean accepted η is doubled above the 0.574 acceptance target, halved below.
    hi = res.accept_rate > 0.574
    expected = torch.where(hi, res.eta_mean * 2, res.eta_mean / 2).clamp(1e-5, 10.0)
    assert torch.equal(res.eta_next, expected)


def _search(target, z: torch.Tensor, eta0: float, s: MALASettings, seed: int = 0):
    lp, g = samplers.value_and_grad(target, z)
    p = torch.randn(z.shape, generator=_gen(seed))
    C = z.shape[0]
    log_a, log_b = torch.full((C,), math.log(0.3)), torch.full((C,), math.log(0.7))
    return samplers.step_size_search(target, z, p, lp, g, torch.full((C,), eta0), log_a, log_b,
                                     torch.ones_like(z[0]), s)


def test_step_size_search_terminates_within_bounds() -> None:
    s = _settings(eta_min=1e-4, eta_max=10.0)
    z = torch.randn(64, 3, generator=_gen(4))
    # Flat target: every move is "too easy" (log r = 0), so η doubles until it would leave η_max.
    eta, prop, evals = _search(lambda z: (0 * z).sum(1), z, 0.5, s)
    assert torch.all(eta <= s.eta_max) and torch.all(eta >= 0.5 * 2**4)
    assert torch.all(evals <= s.max_search + 1)
    # Needle target (s = 1e-6): every move is "too hard", η halves until it would leave η_min.
    eta, prop, evals = _search(lambda z: -0.5 * (z / 1e-6).pow(2).sum(1), z, 1.0, s)
    assert torch.all(eta >= s.eta_min) and torch.all(eta < 2 * s.eta_min)
    assert torch.all(evals <= s.max_search + 1)
    # A NaN target stops at once and proposes nothing acceptable.
    eta, prop, evals = _search(lambda z: z.sum(1) * float("nan"), z, 1.0, s)
    assert torch.all(eta == 1.0) and torch.all(evals == 1) and torch.isnan(prop.log_r).all()


def test_step_size_search_lands_in_band_on_a_gaussian() -> None:
    s = _settings()
    z = torch.randn(256, 2, generator=_gen(5))
    eta, prop, _ = _search(gaussian_target, z, 1e-3, s)  # far too small a start: must grow
    crit = -prop.log_r.abs()
    # Growing chains end one halving below the first η whose move was no longer too easy, so
    # their proposal still satisfies −|log r| ≥ log b; none is left at the start value.
    assert torch.all(crit >= math.log(0.7)) and torch.all(eta > 1e-3)


def test_reversibility_check_rejects_an_irreversible_move() -> None:
    # Deliberately irreversible: the target's mode jumps by 5 after the forward search, so the
    # search from (z', −p') sees a different landscape, picks another η or lands elsewhere, and the
    # move must be rejected even with an MH uniform that would accept anything.
    calls = {"n": 0}
    switch_after = {"n": 10**9}

    def moody(z: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        shift = 5.0 if calls["n"] > switch_after["n"] else 0.0
        return -0.5 * ((z - shift) ** 2).sum(1)

    s = _settings()
    C = 32
    z = torch.randn(C, 2, generator=_gen(6))
    lp, g = samplers.value_and_grad(moody, z)
    p = torch.randn(z.shape, generator=_gen(7))
    log_a, log_b = torch.full((C,), math.log(0.2)), torch.full((C,), math.log(0.9))
    eta_fwd, _, _ = samplers.step_size_search(moody, z, p, lp, g, torch.full((C,), 0.5), log_a, log_b,
                                              torch.ones(2), s)
    n_forward = calls["n"] - 1
    always = torch.full((C,), -math.inf)  # log u = −∞: the MH test alone would accept every move

    calls["n"] = 0
    honest = samplers.mala_move(moody, z, lp, g, p, log_a, log_b, always, torch.full((C,), 0.5),
                                torch.ones(2), s)
    # Honest target: most moves pass (a chain whose reverse search from its own η_init stops
    # elsewhere fails, as it should) and with log u = −∞ exactly the reversible ones are accepted.
    assert honest.reversible.float().mean() > 0.8 and torch.equal(honest.accept, honest.reversible)
    assert torch.equal(honest.eta, eta_fwd)

    calls["n"], switch_after["n"] = 0, n_forward  # switch right after the forward search
    broken = samplers.mala_move(moody, z, lp, g, p, log_a, log_b, always, torch.full((C,), 0.5),
                                torch.ones(2), s)
    assert not broken.reversible.any() and not broken.accept.any()


def test_swap_acceptance_matches_brute_force_and_keeps_the_populations() -> None:
    g = _gen(8)
    K, C = 4, 5
    temps = torch.tensor([0.05, 0.2, 0.6, 1.0])
    z = torch.randn(K, C, 3, generator=g)

    def log_prior(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z * z).sum(-1)

    def log_lik(z: torch.Tensor) -> torch.Tensor:
        return -2.0 * ((z - 0.7) ** 2).sum(-1)

    ell = log_lik(z).sum(1)
    for k in range(K - 1):
        def joint(order: list[int]) -> torch.Tensor:  # Σ_k log γ_{t_k}(population order[k]), all chains
            return sum((log_prior(z[j]) + temps[i] * log_lik(z[j])).sum() for i, j in enumerate(order))

        order = list(range(K))
        swapped = order.copy()
        swapped[k], swapped[k + 1] = k + 1, k
        brute = joint(swapped) - joint(order)
        assert torch.allclose(samplers.swap_log_acceptance(ell, temps, torch.tensor(k)), brute, atol=1e-4)

    # Repeated swaps only permute whole populations: the multiset of populations is unchanged, and
    # the empirical acceptance matches the formula averaged over the uniformly drawn pair.
    cur, accepted = z.clone(), 0
    expected = float(torch.stack([samplers.swap_log_acceptance(ell, temps, torch.tensor(k)).exp().clamp(max=1)
                                  for k in range(K - 1)]).mean())
    n = 3000
    for _ in range(n):
        new, _, acc = samplers.global_swap(z, ell, temps, g)  # from the same state: a Bernoulli test
        accepted += int(acc)
        cur, _, _ = samplers.global_swap(cur, log_lik(cur).sum(1), temps, g)
    assert abs(accepted / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3
    key = lambda t: tuple(t.flatten().tolist())  # noqa: E731
    assert sorted(map(key, cur)) == sorted(map(key, z))


# ---- Conjugate linear-Gaussian latent model --------------------------------------------------------
# z ~ N(0, I_2), x | z ~ N(Wz + b, σ² I_3). Tempered posteriors p_t(z|x) ∝ N(z; 0, I) N(x; Wz + b, σ²)^t
# are Gaussian with precision Λ_t = I + t WᵀW/σ² and mean Λ_t⁻¹ t Wᵀ(x − b)/σ²; log p(x) = log N(x; b,
# WWᵀ + σ²I); E_t[ℓ] = −D/2 log 2πσ² − (|x − b − Wμ_t|² + tr(W Σ_t Wᵀ)) / (2σ²).


class Conjugate:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.d, self.D, self.sigma = 2, 3, 0.5
        f64 = torch.float64
        self.W = torch.randn(self.D, self.d, generator=g, dtype=f64)
        self.b = 0.3 * torch.randn(self.D, generator=g, dtype=f64)
        z_true = torch.tensor([0.8, -0.5], dtype=f64)
        self.x = self.W @ z_true + self.b + self.sigma * torch.randn(self.D, generator=g, dtype=f64)
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=f64)
        self.log_px = float(torch.distributions.MultivariateNormal(self.b, cov).log_prob(self.x))

    def tempered(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        prec = torch.eye(self.d, dtype=torch.float64) + t * self.W.T @ self.W / self.sigma**2
        cov = torch.linalg.inv(prec)
        return cov @ (t * self.W.T @ (self.x - self.b) / self.sigma**2), cov

    def expected_ell(self, t: float) -> float:
        mu, cov = self.tempered(t)
        r = self.x - self.b - self.W @ mu
        quad = r @ r + torch.trace(self.W @ cov @ self.W.T)
        return float(-self.D / 2 * math.log(2 * math.pi * self.sigma**2) - quad / (2 * self.sigma**2))

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z * z).sum(-1) - self.d / 2 * math.log(2 * math.pi)

    def log_lik(self, z: torch.Tensor) -> torch.Tensor:
        r = self.x.float() - z @ self.W.T.float() - self.b.float()
        return -(r * r).sum(-1) / (2 * self.sigma**2) - self.D / 2 * math.log(2 * math.pi * self.sigma**2)


def test_importance_sampling_estimate_converges_to_exact_log_px() -> None:
    m = Conjugate()
    errors = []
    for S in (10, 1000, 100_000):
        z = torch.randn(20, S, 2, generator=_gen(S))  # 20 independent estimates per sample size
        est = samplers.importance_log_evidence(m.log_lik(z))
        errors.append(float((est - m.log_px).abs().mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_annealed_populations_and_thermodynamic_integral_match_the_exact_answers() -> None:
    m = Conjugate()
    K, C, power = 10, 4000, 2.0
    temps = samplers.temperatures(K, power)
    # Discretisation: the trapezoid over exact E_t[ℓ] on this ladder misses log p(x) by 0.041
    # (closed form; N_t = 20 would give 0.010), so allow 0.05 for it.
    exact_e = torch.tensor([m.expected_ell(float(t)) for t in temps], dtype=torch.float64)
    ti_exact = float(samplers.thermodynamic_integral(exact_e, temps.double()))
    assert abs(ti_exact - m.log_px) < 0.05

    g = _gen(9)
    z0 = torch.randn(K, C, 2, generator=g)
    eta = 0.002  # ULA variance bias ≤ 1/(1 − η/(2·0.055)) − 1 = 1.9% at the sharpest posterior axis
    res = samplers.anneal_populations(m.log_prior, m.log_lik, z0, temps[1:], eta, 1500, g)
    assert 0.0 < res.swap_rate < 1.0
    for k in range(K):
        mu, cov = m.tempered(float(temps[k + 1]))
        pop = res.z[k].double()
        sd = cov.diagonal().sqrt()
        # Means within 0.1 posterior sd (≈6 standard errors of 4000 chains, chains autocorrelated by
        # swaps); variances within 8% (1.9% step bias + 4·√(2/4000) = 8.9% sampling at 4σ).
        assert torch.all((pop.mean(0) - mu).abs() < 0.1 * sd), (k, pop.mean(0), mu)
        assert torch.allclose(pop.var(0) / cov.diagonal(), torch.ones(2, dtype=torch.float64), atol=0.089), k

    # The estimator: ℓ means over the prior (t_0) and each population, integrated over t. Sampling
    # error of the sum ≈ 0.02 and the step bias moves E_t[ℓ] by ≈ 0.03, hence 0.1 against the exact
    # discretised integral; the total against log p(x) adds the 0.05 discretisation allowance.
    z_prior = torch.randn(C, 2, generator=g)
    means = torch.cat([m.log_lik(z_prior).mean().unsqueeze(0), m.log_lik(res.z).mean(1)])
    ti = float(samplers.thermodynamic_integral(means, temps))
    assert abs(ti - ti_exact) < 0.1
    assert abs(ti - m.log_px) < 0.15


def test_reference_ti_rule_overweights_the_prior_term() -> None:
    # Δt_1·E_0 + Σ Δt_k E_k: total weight 1 + Δt_1 (the reference's discretisation, an option).
    temps = samplers.temperatures(4, 2.0)
    ones = torch.ones(5)
    assert torch.isclose(samplers.thermodynamic_integral(ones, temps, "trapezoid"), torch.tensor(1.0))
    dt1 = float(temps[1] - temps[0])
    assert torch.isclose(samplers.thermodynamic_integral(ones, temps, "reference"), torch.tensor(1.0 + dt1))
    with pytest.raises(ValueError, match="trapezoid"):
        samplers.thermodynamic_integral(ones, temps, "simpson")


def test_ladder_and_power_schedule() -> None:
    t = samplers.temperatures(5, 3.0)
    assert t[0] == 0 and t[-1] == 1 and torch.all(t[1:] > t[:-1])
    assert torch.isclose(t[2], torch.tensor((2 / 5) ** 3))
    assert samplers.annealing_power(0, 100, 1.0, 6.0) == 1.0
    assert math.isclose(samplers.annealing_power(50, 100, 1.0, 6.0), 3.5)
    assert math.isclose(samplers.annealing_power(100, 100, 1.0, 6.0), 6.0)


def test_same_seed_gives_the_same_chains_bit_for_bit() -> None:
    m = Conjugate()
    z0 = torch.randn(3, 50, 2, generator=_gen(10))

    def run() -> tuple[torch.Tensor, ...]:
        a = samplers.ula(gaussian_target, z0[0], 0.05, 30, _gen(11))
        b = samplers.mala(gaussian_target, z0[0], torch.full((50,), 0.1), _gen(11), _settings(langevin_steps=10))
        c = samplers.anneal_populations(m.log_prior, m.log_lik, z0, torch.tensor([0.3, 0.6, 1.0]), 0.01, 30,
                                        _gen(11))
        return a, b.z, b.eta_next, c.z

    first, second = run(), run()
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(samplers.ula(gaussian_target, z0[0], 0.05, 30, _gen(12)), first[0])


def test_restricted_search_gives_the_same_chains_with_less_work() -> None:
    # Chains that carry their own data (KAEM: one image each): the search may evaluate only the
    # chains still searching, given the target of a subset of rows.
    C = 64
    centres = torch.randn(C, 3, generator=_gen(13)) * 3
    evaluated = {"rows": 0}

    def target_of(c: torch.Tensor):
        def log_target(z: torch.Tensor) -> torch.Tensor:
            evaluated["rows"] += z.shape[0]
            return -0.5 * ((z - c) / 0.3).pow(2).sum(1)

        return log_target

    z0 = torch.randn(C, 3, generator=_gen(14))
    s = _settings(langevin_steps=12)
    full = samplers.mala(target_of(centres), z0, torch.full((C,), 0.05), _gen(15), s)
    rows_full, evaluated["rows"] = evaluated["rows"], 0
    part = samplers.mala(target_of(centres), z0, torch.full((C,), 0.05), _gen(15), s,
                         restrict=lambda rows: target_of(centres[rows]))
    assert torch.allclose(part.z, full.z, atol=1e-5) and torch.equal(part.eta_next, full.eta_next)
    assert torch.equal(part.accept_rate, full.accept_rate)
    assert evaluated["rows"] < 0.8 * rows_full


def test_swaps_can_be_switched_off() -> None:
    m = Conjugate()
    z0 = torch.randn(3, 20, 2, generator=_gen(16))
    temps = torch.tensor([0.3, 0.6, 1.0])
    off = samplers.anneal_populations(m.log_prior, m.log_lik, z0, temps, 0.01, 10, _gen(17), swap_every=0)
    on = samplers.anneal_populations(m.log_prior, m.log_lik, z0, temps, 0.01, 10, _gen(17), swap_every=1)
    assert off.swap_rate == 0.0 and on.swap_rate > 0.0
