"""Importance-sampling loss (docs/design.md §5.3) on the digits preset: finite gradients, a marginal
likelihood that improves with training, bit-exact replay per (seed, step), and the likelihood paths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from training.config import get_preset
from training.losses import importance_sampling_loss, importance_sampling_loss_reference
from training.model.kaem import KAEM
from training.uniforms import step_generator

CFG = get_preset("digits")


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int, offset: int = 0) -> torch.Tensor:
    images = load_digits().images[offset : offset + n] / 16.0
    return torch.tensor(images, dtype=torch.float32).view(n, 1, 8, 8)


def test_gradients_finite_for_every_parameter() -> None:
    model = KAEM(CFG, init_seed=1)
    x = _digits(CFG.train.batch_size)
    out = importance_sampling_loss(model, x, step_generator(0, 0), CFG.posterior)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    names = []
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        names.append(name)
    nonzero = [n for n, p in model.named_parameters() if p.grad.abs().max() > 0]
    assert any(n.startswith("prior.") for n in nonzero) and any(n.startswith("decoder.") for n in nonzero)
    assert len(nonzero) == len(names), set(names) - set(nonzero)
    assert set(out.stats) >= {"loss", "loglik", "log_px", "ess", "resampled"}
    assert all(np.isfinite(v) for v in out.stats.values())
    assert out.z is not None and out.z.shape == (CFG.posterior.n_samples, CFG.prior.Q, CFG.prior.P)


def test_marginal_likelihood_improves_with_training() -> None:
    model = KAEM(CFG, init_seed=0)
    x = _digits(64)

    def log_px() -> float:  # IS estimate of log p(x), averaged over held-out generators
        with torch.no_grad():
            return float(np.mean([importance_sampling_loss(model, x, step_generator(999, k), CFG.posterior)
                                  .stats["log_px"] for k in range(3)]))

    before = log_px()
    opt = torch.optim.Adam(model.parameters(), lr=CFG.train.lr)
    for step in range(150):
        out = importance_sampling_loss(model, x, step_generator(1, step), CFG.posterior)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = log_px()
    # Per image, σ = 0.1 on 64 pixels: untrained ≈ -560; 150 steps reach ≈ -210 (seeded).
    assert after > before + 200, (before, after)


def test_same_seed_and_step_give_bit_identical_loss_and_gradients() -> None:
    model = KAEM(CFG, init_seed=2)
    x = _digits(16)

    def run(seed: int, step: int) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        out = importance_sampling_loss(model, x, step_generator(seed, step), CFG.posterior)
        out.loss.backward()
        return out.loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = run(4, 7)
    loss_b, grads_b = run(4, 7)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert run(4, 8)[0] != loss_a
    assert run(5, 7)[0] != loss_a


def test_no_noise_log_likelihood_is_explicit_formula() -> None:
    model = KAEM(CFG, init_seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 2, 2, generator=gen)
    logits = torch.randn(4, 1, 2, 2, generator=gen) * 2
    got = model.log_likelihood(x, logits, None).double()
    want = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        for s in range(4):
            xhat = torch.sigmoid(logits[s].double())
            want[b, s] = -((x[b].double() - xhat) ** 2).sum() / (2 * model.sigma**2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # The noisy path with ε = 0 is the same function.
    zero = model.log_likelihood(x, logits, torch.zeros(3, 4, 4))
    torch.testing.assert_close(zero.double(), want, rtol=1e-5, atol=1e-4)


def test_noisy_log_likelihood_formula_and_gradient() -> None:
    model = KAEM(CFG, init_seed=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 2, 3, generator=gen, dtype=torch.float64)
    logits = (torch.randn(3, 1, 2, 3, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    noise = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    got = model.log_likelihood(x, logits, noise)
    xhat = torch.sigmoid(logits.flatten(1).unsqueeze(0) + model.sigma_n * noise)
    want = -((x.flatten(1).unsqueeze(1) - xhat) ** 2).sum(-1) / (2 * model.sigma**2)
    torch.testing.assert_close(got, want)
    # The hand-written backward equals autograd of the formula (float64 finite differences).
    assert torch.autograd.gradcheck(lambda g: model.log_likelihood(x, g, noise), (logits,))


def test_decoder_noise_is_pre_activation_with_std_sigma_n() -> None:
    # The mean of the noisy likelihood over ε must equal ∫ ℓ(x, sigmoid(g + σ_n ε)) N(ε) dε, computed
    # here per pixel by 60-node Gauss-Hermite. Noise after the sigmoid or at another scale moves the
    # mean by more than the Monte-Carlo error (checked against the noiseless value below).
    model = KAEM(CFG, init_seed=3)
    gen = torch.Generator().manual_seed(2)
    B, S, D, M = 2, 3, 5, 40_000
    x = torch.rand(B, 1, 1, D, generator=gen, dtype=torch.float64)
    logits = torch.randn(S, 1, 1, D, generator=gen, dtype=torch.float64)
    half = torch.randn(M // 2 * B, S, D, generator=gen, dtype=torch.float64)
    noise = torch.cat([half, -half])  # antithetic pairs cancel the first-order term's variance
    draws = model.log_likelihood(x.repeat(M, 1, 1, 1), logits, noise).view(M, B, S)
    pairs = 0.5 * (draws[: M // 2] + draws[M // 2 :])
    mc, mc_err = pairs.mean(0), pairs.std(0) / (M // 2) ** 0.5
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)  # ∫ h(ε) exp(-ε²/2) dε
    eps = torch.tensor(nodes)
    prob = torch.tensor(weights / np.sqrt(2 * np.pi))
    xhat = torch.sigmoid(logits.flatten(1).unsqueeze(-1) + model.sigma_n * eps)  # [S, D, K]
    sq = ((x.flatten(1)[:, None, :, None] - xhat) ** 2 * prob).sum(-1)  # E_ε (x - x̂)², [B, S, D]
    exact = -sq.sum(-1) / (2 * model.sigma**2)
    torch.testing.assert_close(mc, exact, atol=float(5 * mc_err.max()), rtol=0)
    noiseless = model.log_likelihood(x, logits, None)
    assert ((exact - noiseless).abs() > 20 * mc_err).all(), "the noise must matter at this σ_n"


def test_decoder_noise_switch_changes_only_the_likelihood_noise() -> None:
    model = KAEM(CFG, init_seed=4)
    x = _digits(8)
    quiet = dataclasses.replace(CFG.posterior, decoder_noise=False, ess_threshold=0.0)
    noisy = dataclasses.replace(CFG.posterior, decoder_noise=True, ess_threshold=0.0)
    with torch.no_grad():
        a = importance_sampling_loss(model, x, step_generator(0, 1), quiet)
        b = importance_sampling_loss(model, x, step_generator(0, 1), noisy)
    # Same proposals (the first draws of the generator), different likelihood noise.
    assert torch.equal(a.z, b.z)
    assert a.stats["prior_prior"] == b.stats["prior_prior"]
    assert a.stats["loglik"] != b.stats["loglik"]
    assert a.stats["log_px"] == pytest.approx(b.stats["log_px"], rel=0.1)


def test_normalised_prior_path_gives_finite_gradients() -> None:
    # contrastive = False: no CD prior term, the posterior term uses the quadrature log Z (docs/design.md §5.2).
    model = KAEM(CFG, init_seed=5)
    post = dataclasses.replace(CFG.posterior, contrastive=False)
    out = importance_sampling_loss(model, _digits(8), step_generator(0, 0), post)
    out.loss.backward()
    assert out.stats["prior_prior"] == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["univariate", "mixture", "independent"])
@pytest.mark.parametrize("case", ["noisy", "quiet", "no_resampling", "normalised", "cd_samples", "many_proposals"])
def test_fast_loss_equals_the_direct_form(kind: str, case: str) -> None:
    """The default loss builds gradients from the weighted (image, proposal) pairs only; its value, stats
    and every parameter gradient equal the direct form's, where all B×N_s pairs carry gradients (N_s = B:
    one decode of every proposal with gradients; N_s > B: a frozen decode, then the used ones again)."""
    post = {"noisy": CFG.posterior, "quiet": dataclasses.replace(CFG.posterior, decoder_noise=False),
            "no_resampling": dataclasses.replace(CFG.posterior, ess_threshold=0.0),
            "normalised": dataclasses.replace(CFG.posterior, contrastive=False),
            "cd_samples": dataclasses.replace(CFG.posterior, cd_samples=7),
            # N_s > B: weights from a frozen forward, gradients from decoding the used proposals again
            "many_proposals": dataclasses.replace(CFG.posterior, n_samples=3 * CFG.train.batch_size)}[case]
    model = KAEM(dataclasses.replace(CFG, prior=dataclasses.replace(CFG.prior, kind=kind)), init_seed=6)
    x = _digits(CFG.train.batch_size)
    results = []
    for fn in (importance_sampling_loss, importance_sampling_loss_reference):
        model.zero_grad()
        out = fn(model, x, step_generator(3, 11), post)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, g_fast), (ref, g_ref) = results
    assert torch.equal(fast.z, ref.z)
    assert float(fast.loss) == pytest.approx(float(ref.loss), rel=1e-5)
    for key, value in ref.stats.items():
        assert fast.stats[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-7,
                                   msg=name)


def test_parallel_decoder_noise_is_standard_normal_and_independent_of_threads() -> None:
    from training.losses import NOISE_CHUNKS, standard_normal

    shape = (64, 100, 200)  # 1.28 M numbers: the chunked, threaded path
    before = torch.get_num_threads()
    try:
        draws = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws.append(standard_normal(shape, step_generator(0, 7), torch.device("cpu")))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[0], draws[1])  # the same numbers whatever the thread count
    e = draws[0].double()
    n = e.numel()
    assert abs(float(e.mean())) < 5 / n**0.5 and abs(float(e.var()) - 1) < 10 / n**0.5
    assert abs(float((e**4).mean()) - 3) < 0.05  # Gaussian tails, not uniform or clipped
    chunks = e.view(-1).chunk(NOISE_CHUNKS)  # no chunk repeats another's stream
    assert not torch.equal(chunks[0][:1000], chunks[1][:1000])
    assert not torch.equal(draws[0], standard_normal(shape, step_generator(0, 8), torch.device("cpu")))
