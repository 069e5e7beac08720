"""The Langevin-family estimators inside KAEM training (docs/design.md §5.4-5.5): one loss signature with IS,
finite gradients, reproducible steps, a data term that improves, MALA step sizes carried through
checkpoints bit for bit, the posterior-driven domain update, the colour presets running a few steps
on synthetic files in the real formats, and the --posterior flag."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import TEST_READERS, write_celeba, write_cifar10, write_svhn
from sklearn.datasets import load_digits
from testpaths import ROOT

from training import train as train_module
from training.checkpoint import load_checkpoint
from training.config import get_preset, with_overrides
from training.data import datasets as data
from training.eval.health import latent_health
from training.losses import POSTERIORS, StepContext
from training.model.kaem import KAEM
from training.model.prior import gauss_legendre, normal_cdf
from training.train import train
from training.uniforms import step_generator

CFG = get_preset("digits")
LANGEVIN = ("ula", "mala", "thermo")


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int) -> torch.Tensor:
    return torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32).view(n, 1, 8, 8)


def _cfg(kind: str, **train):
    cfg = with_overrides(CFG, **train) if train else CFG
    return replace(cfg, posterior=replace(cfg.posterior, kind=kind))


@pytest.mark.parametrize("kind", LANGEVIN)
def test_estimator_gives_finite_gradients_and_its_statistics(kind: str) -> None:
    cfg = _cfg(kind)
    model = KAEM(cfg, init_seed=1)
    x = _digits(16)
    out = POSTERIORS[kind](model, x, step_generator(0, 0), cfg.posterior, StepContext(step=10, total_steps=100))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("prior.") and g.abs().max() > 0 for n, g in grads.items())
    assert any(n.startswith("decoder.") and g.abs().max() > 0 for n, g in grads.items())
    assert out.z is not None and out.z.shape == (16, cfg.prior.Q, cfg.prior.P)
    assert all(np.isfinite(v) for v in out.stats.values())
    expected = {"ula": {"loglik", "eta"}, "mala": {"accept", "eta", "reversible", "search_evals"},
                "thermo": {"log_px", "swap_rate", "power", "loglik_prior"}}[kind]
    assert {"loss", "loglik", "prior_post", "prior_prior"} | expected <= set(out.stats)
    if kind == "mala":
        assert out.carry["mala_eta"].shape == (16,)
        assert 0 <= out.stats["accept"] <= 1
    if kind == "thermo":
        assert 1.0 < out.stats["power"] < 6.0  # cosine schedule at step 10 of 100
        # Tempered chains fit the images better than prior draws, so the integral sits above the
        # prior's ℓ mean (the upper end is not a bound for 10-step chains: E_t[ℓ] estimates are noisy).
        assert out.stats["loglik_prior"] < out.stats["log_px"]


@pytest.mark.parametrize("kind", LANGEVIN)
def test_same_step_generator_gives_the_same_loss_bit_for_bit(kind: str) -> None:
    cfg = _cfg(kind)
    x = _digits(8)

    def run(seed: int):
        model = KAEM(cfg, init_seed=2)
        out = POSTERIORS[kind](model, x, step_generator(seed, 3), cfg.posterior, StepContext(step=3, total_steps=10))
        return out.loss.detach(), out.z

    (la, za), (lb, zb), (_, zc) = run(0), run(0), run(1)
    assert torch.equal(la, lb) and torch.equal(za, zb)
    assert not torch.equal(za, zc)


@pytest.mark.parametrize("kind", LANGEVIN)
def test_short_training_improves_the_data_term(kind: str, tmp_path: Path) -> None:
    steps = 40
    train(_cfg(kind, steps=steps, log_every=10), tmp_path, torch.device("cpu"), progress=False)
    recs = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 1 and recs[-1]["step"] == steps
    # Per-image posterior log-likelihood (σ = 0.1, 64 pixels): measured gains are 100+ nats.
    assert recs[-1]["loglik"] > recs[0]["loglik"] + 20, (recs[0]["loglik"], recs[-1]["loglik"])
    # The grid refit at step 0 moved the quadrature domain to the posterior chains' range.
    assert recs[-1]["domain"] != list(CFG.prior.domain)


def test_mala_step_sizes_survive_resume_bit_for_bit(tmp_path: Path) -> None:
    full = train(_cfg("mala", steps=6), tmp_path / "full", torch.device("cpu"), progress=False)
    train(_cfg("mala", steps=3), tmp_path / "split", torch.device("cpu"), progress=False)
    resumed = train(_cfg("mala", steps=6), tmp_path / "split", torch.device("cpu"), resume=True, progress=False)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    eta_a, eta_b = a["train_state"]["carry"]["mala_eta"], b["train_state"]["carry"]["mala_eta"]
    assert eta_a.shape == (1, CFG.train.batch_size) and torch.equal(eta_a, eta_b)
    assert not torch.all(eta_a == CFG.posterior.step_size)  # it adapted


def test_domain_update_rebuilds_quadrature_from_posterior_samples(tmp_path: Path) -> None:
    path = train(_cfg("ula", steps=1), tmp_path, torch.device("cpu"), progress=False)
    state = load_checkpoint(path)["model"]
    lo, hi = state["prior.domain"].tolist()
    assert (lo, hi) != CFG.prior.domain and lo < 0 < hi
    nodes, _ = gauss_legendre(CFG.prior.n_quad, lo, hi)
    assert torch.allclose(state["prior.nodes"], nodes)
    assert state["prior.knots"][0] == pytest.approx(lo) and state["prior.knots"][-1] == pytest.approx(hi)


def _colour_files(name: str, root: Path) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    if name == "svhn":
        write_svhn(root, "train", rng.integers(0, 256, (32, 32, 3, 8), dtype=np.uint8))
    elif name == "cifar10":
        write_cifar10(root, rng, per_batch=2)
    else:
        faces = [rng.integers(0, 256, (218, 178, 3), dtype=np.uint8) for _ in range(6)]
        write_celeba(root, faces, partition=[0, 0, 0, 0, 1, 2])


@pytest.mark.parametrize(("preset", "kind"), [("svhn", "thermo"), ("cifar10", "ula"), ("celeba", "ula")])
def test_colour_presets_train_a_few_steps_on_synthetic_files(preset: str, kind: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name, cls in TEST_READERS.items():
        monkeypatch.setitem(data.READERS, name, cls)
    # The log's latent health costs a forward pass per (seed, latent coordinate): 64 × 81 decodes of the
    # CIFAR-10 decoder are ~100 s per log line here, 1 % of a real run's 100 steps but 98 % of this test's time.
    # Two Jacobian seeds keep the code path; tests/training_tests/eval covers the numbers.
    monkeypatch.setattr(train_module, "latent_health", partial(latent_health, n_latent=256, n_jacobian=2))
    _colour_files(preset, tmp_path / "data")
    base = get_preset(preset)
    cfg = with_overrides(base, steps=2, batch_size=2, log_every=1)
    # The preset's Langevin settings (η, 40 steps, N_t) unchanged; only the batch is shrunk.
    cfg = replace(cfg, posterior=replace(cfg.posterior, kind=kind))
    path = train(cfg, tmp_path / "run", torch.device("cpu"), data_root=str(tmp_path / "data"), progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    assert load_checkpoint(path)["step"] == 2


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_posterior_flag() -> None:
    out = _cli("--preset", "svhn", "--posterior", "thermo", "--batch-size", "7", "--dry-run")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["posterior"]["kind"] == "thermo" and cfg["train"]["batch_size"] == 7
    assert cfg["posterior"]["step_size"] == 1e-3 and cfg["posterior"]["langevin_steps"] == 40
    bad = _cli("--preset", "digits", "--posterior", "hmc")
    assert bad.returncode == 2 and "invalid choice: 'hmc'" in bad.stderr and "Traceback" not in bad.stderr


# ---- is_ula: importance-sampled chain starts, ULA moves in the prior's noise space ----------------------


@pytest.mark.parametrize("prior_kind", ["univariate", "mixture"])
def test_is_ula_gradients_stats_and_chains_inside_the_domain(prior_kind: str) -> None:
    cfg = _cfg("is_ula")
    cfg = replace(cfg, prior=replace(cfg.prior, kind=prior_kind), posterior=replace(cfg.posterior, step_size=3e-3))
    model = KAEM(cfg, init_seed=1)
    x = _digits(16)
    out = POSTERIORS["is_ula"](model, x, step_generator(0, 0), cfg.posterior)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert {"ess", "move", "loglik_start", "loglik", "eta"} <= set(out.stats)
    assert out.stats["move"] > 0 and 1 <= out.stats["ess"] <= cfg.posterior.n_samples
    a, b = cfg.prior.domain
    assert float(out.z.min()) >= a and float(out.z.max()) <= b  # z = F⁻¹(Φ(ε)) stays in the prior's support
    same = POSTERIORS["is_ula"](model, x, step_generator(0, 0), cfg.posterior)
    assert torch.equal(same.z, out.z) and torch.equal(same.loss, out.loss)


@pytest.mark.parametrize("prior_kind", ["univariate", "mixture"])
def test_persistent_is_ula_continues_stored_chains_and_draws_is_starts_only_for_new_rows(
        prior_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.losses as losses

    cfg = _cfg("is_ula")
    cfg = replace(cfg, prior=replace(cfg.prior, kind=prior_kind),
                  posterior=replace(cfg.posterior, step_size=3e-3, persistent=True))
    model = KAEM(cfg, init_seed=1)
    x = _digits(16)
    its = model.prior.u_dim - model.prior.its_dim
    plain = POSTERIORS["is_ula"](model, x, step_generator(0, 0), replace(cfg.posterior, persistent=False))
    assert plain.chains is None
    unvisited = torch.full((16, model.u_dim), float("nan"))
    first = POSTERIORS["is_ula"](model, x, step_generator(0, 0), cfg.posterior, StepContext(chains=unvisited))
    # no stored chain yet: exactly the IS-started step, which now hands back where each chain ended
    assert torch.equal(first.z, plain.z) and torch.equal(first.loss, plain.loss) and first.stats["fresh"] == 1.0
    assert first.chains.shape == (16, model.u_dim) and torch.isfinite(first.chains).all()
    assert torch.equal(model.prior.sample(torch.cat([first.chains[:, :its], normal_cdf(first.chains[:, its:])], 1)),
                      first.z)

    # half the rows stored: those continue their chains (0 moves: they stay put), the others draw IS starts
    stay = replace(cfg.posterior, langevin_steps=0)
    half = torch.cat([first.chains[:8], unvisited[8:]])
    out = POSTERIORS["is_ula"](model, x, step_generator(0, 1), stay, StepContext(chains=half))
    assert torch.equal(out.chains[:8], first.chains[:8]) and out.stats["fresh"] == 0.5 and "ess" in out.stats
    assert not torch.equal(out.chains[8:], first.chains[8:])  # new IS starts from other proposals

    # every row stored: no proposals are drawn or decoded, and no ESS is reported
    monkeypatch.setattr(losses, "_proposals", lambda *a, **k: pytest.fail("decoded proposals for stored chains"))
    out = POSTERIORS["is_ula"](model, x, step_generator(0, 2), cfg.posterior, StepContext(chains=first.chains))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.stats["fresh"] == 0.0 and "ess" not in out.stats and out.stats["move"] > 0
    assert torch.equal(out.chains[:, :its], first.chains[:, :its])  # the components chosen at the start stay


def test_is_ula_pool_refreshes_the_oldest_proposals_and_rescores_each_images_finalists() -> None:
    cfg = _cfg("is_ula")
    po = replace(cfg.posterior, n_samples=32, pool_refresh=8, pool_finalists=3, langevin_steps=0)
    model = KAEM(replace(cfg, posterior=po), init_seed=1)
    x = _digits(16)

    def means(u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(model.decode(model.prior.sample(u))).flatten(1)

    first = POSTERIORS["is_ula"](model, x, step_generator(0, 0), po, StepContext())
    pool = first.carry
    assert pool["pool_u"].shape == (32, model.u_dim) and pool["pool_means"].shape == (32, 64)
    torch.testing.assert_close(pool["pool_means"], means(pool["pool_u"]), rtol=0, atol=1e-6)  # all fresh

    with torch.no_grad():  # a training step later: the stored means are stale
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    out = POSTERIORS["is_ula"](model, x, step_generator(0, 1), po, StepContext(carry=pool))
    new = out.carry
    assert torch.equal(new["pool_u"][8:], pool["pool_u"][:24])  # the 8 oldest left, 8 fresh ones came first
    assert not (new["pool_u"][:8, None] == pool["pool_u"][None]).all(-1).any()
    current = means(new["pool_u"])
    torch.testing.assert_close(new["pool_means"][:8], current[:8], rtol=0, atol=1e-6)
    rescored = ~(new["pool_means"][8:] == pool["pool_means"][:24]).all(1)  # kept rows decoded again this step
    assert 3 <= int(rescored.sum()) <= 16 * 3
    torch.testing.assert_close(new["pool_means"][8:][rescored], current[8:][rescored], rtol=0, atol=1e-6)
    # with 0 moves each chain is its start (up to the rounding of u -> ε -> u): a pool proposal that was rescored
    z_pool = model.prior.sample(new["pool_u"])
    dist, near = torch.cdist(out.z.flatten(1), z_pool.flatten(1)).topk(2, dim=1, largest=False)
    assert dist[:, 0].max() < 1e-2 and (dist[:, 1] > 10 * dist[:, 0]).all()
    start = near[:, 0]
    finalist = torch.cat([torch.ones(8, dtype=torch.bool), rescored])
    assert finalist[start].all()
    assert 1.0 <= out.stats["ess"] <= 3.0 and out.stats["pool_gap"] > 0


def test_is_ula_training_improves_the_data_term_and_keeps_the_domain(tmp_path: Path) -> None:
    cfg = _cfg("is_ula", steps=40, log_every=10)
    cfg = replace(cfg, posterior=replace(cfg.posterior, step_size=3e-4, langevin_steps=10))
    path = train(cfg, tmp_path, torch.device("cpu"), progress=False)
    recs = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert recs[-1]["loglik"] > recs[0]["loglik"] + 20
    assert "domain" not in recs[-1]  # the chains cannot leave it, so it never follows them
    assert load_checkpoint(path)["model"]["prior.domain"].tolist() == pytest.approx(list(CFG.prior.domain))
