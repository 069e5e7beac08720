"""Resampling (docs/design.md §5.3, paper A.6.2): residual / systematic / stratified are unbiased, keep the
deterministic copies, return valid indices; the IS loss weights ω are 1/N_s after resampling, w otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.config import PosteriorConfig, get_preset
from training.losses import importance_sampling_loss
from training.mcmc.resample import RESAMPLERS, residual, stratified, systematic
from training.model.kaem import KAEM

N = 8
# Non-integer N·w everywhere except the zero weight, one weight above 2/N.
W = torch.tensor([0.03, 0.31, 0.0, 0.12, 0.07, 0.2, 0.14, 0.13])
TOP = 1.0 - 2.0**-24  # the largest float32 below 1; torch.rand returns it (and 0.0)


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(idx, n).sum(-2).double()


def _draw(name: str, w: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    v = torch.rand(rows, w.shape[-1], generator=torch.Generator().manual_seed(seed))
    return RESAMPLERS[name](w.expand(rows, -1), v)


def test_weights_are_a_distribution() -> None:
    assert float(W.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["residual", "systematic", "stratified"])
def test_indices_valid(name: str) -> None:
    w = torch.softmax(torch.randn(500, 13, generator=torch.Generator().manual_seed(0)) * 3, -1)
    v = torch.rand(500, 13, generator=torch.Generator().manual_seed(1))
    idx = RESAMPLERS[name](w, v)
    assert idx.shape == (500, 13) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) <= 12


@pytest.mark.parametrize("name", ["residual", "systematic", "stratified"])
def test_unbiased_counts(name: str) -> None:
    rows = 20000
    counts = _counts(_draw(name, W, rows, seed=3), N)
    assert torch.equal(counts.sum(1), torch.full((rows,), float(N)))
    mean = counts.mean(0)
    expected = N * W.double()
    if name == "residual":  # the R free slots are multinomial on the residual weights
        r = torch.floor(expected)
        R = N - r.sum()
        p = (expected - r) / R
        std = torch.sqrt(R * p * (1 - p))
        torch.testing.assert_close(counts.std(0), std, atol=0.02, rtol=0.05)
    else:
        std = counts.std(0)
    tol = 5 * std / rows**0.5 + 1e-9
    assert ((mean - expected).abs() <= tol).all(), (mean, expected, tol)
    assert torch.equal(counts[:, 2], torch.zeros(rows)), "a zero-weight index was drawn"


@pytest.mark.parametrize("name", ["residual", "systematic"])
def test_deterministic_copies_always_present(name: str) -> None:
    counts = _counts(_draw(name, W, 5000, seed=4), N)
    floor = torch.floor(N * W.double())
    assert (counts >= floor).all()
    if name == "systematic":  # evenly spaced points: every count is ⌊N w⌋ or ⌈N w⌉
        assert (counts <= torch.ceil(N * W.double())).all()


def test_residual_deterministic_slots_come_first_in_index_order() -> None:
    idx = _draw("residual", W, 100, seed=5)
    det = torch.repeat_interleave(torch.arange(N), torch.floor(N * W).long())
    assert torch.equal(idx[:, : det.numel()], det.expand(100, -1))


@pytest.mark.parametrize("n", [4, 7, 8, 10, 32])
def test_residual_exact_k_over_n_weights_are_deterministic(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        k = torch.bincount(torch.randint(0, n, (n,), generator=gen), minlength=n)
        w = (k.float() / n).expand(6, n)
        v = torch.rand(6, n, generator=gen)
        v[0] = 0.0
        v[1] = TOP
        idx = residual(w, v)
        assert torch.equal(idx, torch.repeat_interleave(torch.arange(n), k).expand(6, n)), k


def test_one_hot_weight_copies_one_index() -> None:
    w = torch.zeros(3, 6)
    w[:, 4] = 1.0
    v = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    for fn in (residual, systematic, stratified):
        assert torch.equal(fn(w, v), torch.full((3, 6), 4))


@pytest.mark.parametrize("name", ["residual", "systematic", "stratified"])
def test_rows_are_independent(name: str) -> None:
    # Row b's indices depend only on row b's weights and uniforms.
    gen = torch.Generator().manual_seed(6)
    w = torch.softmax(torch.randn(4, 10, generator=gen), -1)
    v = torch.rand(4, 10, generator=gen)
    full = RESAMPLERS[name](w, v)
    for b in range(4):
        assert torch.equal(RESAMPLERS[name](w[b : b + 1], v[b : b + 1]), full[b : b + 1])


@pytest.mark.parametrize("name", ["residual", "systematic", "stratified"])
def test_zero_weight_never_selected_at_v_zero(name: str) -> None:
    # #{s : cum_s < 0} = 0 picks s = 0 although its weight (and residual weight) is 0.
    w = torch.tensor([[0.0, 0.3, 0.3, 0.4]])
    idx = RESAMPLERS[name](w, torch.zeros(1, 4))
    assert not (idx == 0).any(), idx


def test_zero_weight_never_selected_at_top_uniform() -> None:
    # softmax underflows the last weight to exactly 0; the residual cumsum ends at 1 - 2^-23 < TOP,
    # so #{s : cum_s < TOP} = N and the clamp returns the zero-weight index N - 1.
    w = torch.softmax(torch.tensor([[0.0, 0.1, 0.2, -1000.0]]), 1)
    assert float(w[0, 3]) == 0.0
    idx = residual(w, torch.full((1, 4), TOP))
    assert not (idx == 3).any(), idx


def test_the_binary_search_counts_what_compare_and_count_does() -> None:
    # inverse_cumsum and the residual's deterministic slots search the cumulative sums (searchsorted, right side);
    # the definition is #{s : cum_s ≤ v} over the whole row: equal on ties (zero weights), at v on a cumulative
    # value, at 0 and at the top uniform, for every resampler.
    from training.mcmc.resample import inverse_cumsum

    g = torch.Generator().manual_seed(3)
    w = torch.softmax(torch.randn(64, 50, generator=g) * 6, 1)
    w[:, 10:20] = 0.0  # runs of ties
    w[5] = 1.0 / 50  # uniform: cumulative values k/50
    w = w / w.sum(1, keepdim=True)
    v = torch.rand(64, 50, generator=g)
    v[0], v[1], v[2] = 0.0, TOP, torch.cumsum(w[2], 0)  # both ends, and on the cumulative values
    cum = torch.cumsum(w, 1)
    norm = cum / cum[:, -1:]
    want = torch.clamp((norm.unsqueeze(1) <= v.unsqueeze(-1)).sum(-1), max=49)
    assert torch.equal(inverse_cumsum(cum, v), want)
    r = torch.floor(50 * w)
    slot = torch.arange(50, dtype=w.dtype).expand_as(w)
    det = torch.clamp((torch.cumsum(r, -1).unsqueeze(1) <= slot.unsqueeze(-1)).sum(-1), max=49)
    rows = (slot < r.sum(-1, keepdim=True))
    assert torch.equal(residual(w, v)[rows], det[rows])


# ----------------------------------------------------------------------------------------------
# ω in the IS loss (docs/design.md §5.3 step 6, §9 bug 3)


def _tiny(threshold: float, S: int = 16) -> tuple[KAEM, torch.Tensor, PosteriorConfig]:
    cfg = get_preset("digits")
    post = dataclasses.replace(cfg.posterior, n_samples=S, ess_threshold=threshold, decoder_noise=False)
    model = KAEM(cfg, init_seed=2)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return model, x, post


def _replay(model: KAEM, x: torch.Tensor, S: int, seed: int) -> dict[str, torch.Tensor]:
    """The draws importance_sampling_loss makes from gen (decoder_noise off): u, u', v — in that order."""
    gen = torch.Generator().manual_seed(seed)
    prior = model.prior
    u1 = torch.rand(S, prior.u_dim, generator=gen)
    u2 = torch.rand(S, prior.u_dim, generator=gen)
    v = torch.rand(x.shape[0], S, generator=gen)
    with torch.no_grad():
        z, zp = prior.sample(u1), prior.sample(u2)
        ell = model.log_likelihood(x, model.decode(z), None)
        return {"z": z, "ell": ell, "w": torch.softmax(ell, 1), "v": v,
                "logp": prior.log_prob(z), "prior_term": prior.log_prob(zp).mean()}


def test_is_weights_without_resampling_are_w() -> None:
    model, x, post = _tiny(threshold=0.0)
    out = importance_sampling_loss(model, x, torch.Generator().manual_seed(7), post)
    r = _replay(model, x, post.n_samples, 7)
    w, ell = r["w"].double(), r["ell"].double()
    assert out.stats["resampled"] == 0.0
    assert out.stats["loglik"] == pytest.approx(float((w * ell).sum(1).mean()), rel=1e-5)
    post_term = (w * (r["logp"].double() + ell)).sum(1).mean()
    assert out.loss.item() == pytest.approx(float(-(post_term - r["prior_term"])), rel=1e-5)
    # The reference's softmax of probabilities would be a different number here (so the test can fail).
    ref = (torch.softmax(w, 1) * ell).sum(1).mean()
    assert abs(float(ref) - out.stats["loglik"]) > 1.0


def test_is_weights_after_resampling_are_uniform_over_resampled_indices() -> None:
    model, x, post = _tiny(threshold=1.01)  # ESS ≤ N_s < 1.01 N_s: every row resamples
    out = importance_sampling_loss(model, x, torch.Generator().manual_seed(8), post)
    r = _replay(model, x, post.n_samples, 8)
    idx = residual(r["w"], r["v"])
    ell = r["ell"].double()
    assert out.stats["resampled"] == 1.0
    assert out.stats["loglik"] == pytest.approx(float(ell.gather(1, idx).mean()), rel=1e-5)
    post_term = (r["logp"].double()[idx] + ell.gather(1, idx)).mean(1).mean()
    assert out.loss.item() == pytest.approx(float(-(post_term - r["prior_term"])), rel=1e-5)


def test_is_weights_mixed_rows_follow_each_rows_ess() -> None:
    S = 16
    model, x, _ = _tiny(threshold=0.0, S=S)
    r = _replay(model, x, S, 9)
    ess = 1.0 / (r["w"] * r["w"]).sum(1)
    lo, hi = sorted(ess.tolist())[1:3]
    assert hi > lo, "need rows on both sides of the threshold"
    threshold = 0.5 * (lo + hi) / S  # rows with ESS ≤ lo resample, the others keep w
    _, _, post = _tiny(threshold=threshold, S=S)
    out = importance_sampling_loss(model, x, torch.Generator().manual_seed(9), post)
    resample = ess < threshold * S
    assert 0 < int(resample.sum()) < x.shape[0]
    idx = torch.where(resample[:, None], residual(r["w"], r["v"]), torch.arange(S).expand(x.shape[0], S))
    omega = torch.where(resample[:, None], torch.full_like(r["w"], 1.0 / S), r["w"]).double()
    ell = r["ell"].double()
    assert out.stats["resampled"] == pytest.approx(float(resample.double().mean()))
    assert out.stats["loglik"] == pytest.approx(float((omega * ell.gather(1, idx)).sum(1).mean()), rel=1e-5)
