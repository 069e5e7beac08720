"""The VAE and latent-EBM baselines in the KAEM harness: they train on tiny real data with finite
losses and an improving data term, use the same checkpoint format and sampling path, are refused by
the KAEM-only tools with a clear message, and kaem-compare trains, scores and tabulates all three."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from testpaths import ROOT

from training.checkpoint import load_model
from training.config import get_preset, with_model, with_overrides
from training.model.baselines import VAE, LatentEBM, standard_normal
from training.model.registry import build_model
from training.sample import sample_images
from training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(model: str, steps: int):
    return with_model(with_overrides(get_preset("digits"), steps=steps, log_every=10, checkpoint_every=1000), model)


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    return {m: train(_cfg(m, steps), root / m, torch.device("cpu"), progress=False)
            for m, steps in (("vae", 150), ("lebm", 40))}


def test_vae_trains_and_its_elbo_improves(runs: dict[str, Path]) -> None:
    recs = _records(runs["vae"].parent)
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["elbo"] > recs[0]["elbo"] + 100  # per image, σ = 0.1 on 64 pixels; measured ≈ +250
    assert recs[-1]["kl"] > 0


def test_latent_ebm_trains_and_its_posterior_loglik_improves(runs: dict[str, Path]) -> None:
    recs = _records(runs["lebm"].parent)
    assert all(np.isfinite(r["loss"]) for r in recs)
    # Its contrastive loss is not a bound; the data term is the posterior chains' log-likelihood.
    assert recs[-1]["loglik"] > recs[0]["loglik"] + 50


@pytest.mark.parametrize(("name", "cls"), [("vae", VAE), ("lebm", LatentEBM)])
def test_same_checkpoint_format_and_sampling_path(runs: dict[str, Path], name: str, cls: type) -> None:
    model, ckpt = load_model(runs[name])
    assert isinstance(model, cls) and ckpt["step"] > 0
    assert json.loads(ckpt["config_json"])["model"] == name
    a = sample_images(model, range(8))
    assert a.shape == (8, 8, 8, 1) and a.dtype == np.uint8 and a.std() > 0
    # A seed is a pure input: the same seed gives the same image alone or inside a batch. The VAE's
    # single pass matches within rounding; the latent EBM's 60-step chain amplifies the float
    # rounding that differs between batch sizes (reduction order in batched matmuls), so its pixels
    # agree on average and drift by a few grey levels at most.
    alone = sample_images(model, [5])
    diff = np.abs(alone[0].astype(int) - a[5].astype(int))
    if name == "vae":
        assert diff.max() <= 1
    else:
        assert diff.mean() <= 1.0 and diff.max() <= 16
    assert not np.array_equal(a[0], a[1])


def test_latent_ebm_generation_is_its_langevin_prior_chain() -> None:
    cfg = replace(_cfg("lebm", 1), baseline=replace(get_preset("digits").baseline, prior_steps=7))
    model = build_model(cfg, init_seed=0)
    assert model.noise_dim == cfg.prior.Q * 8
    u = torch.rand(4, model.noise_dim, generator=torch.Generator().manual_seed(0))
    n = standard_normal(u)
    z = n[:, : cfg.prior.Q]
    for t in range(7):  # the chain written out: z ← z + η ∇ log π̃(z) + √(2η) ξ_t
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model.log_prior(zz).sum(), zz)
        xi = n[:, cfg.prior.Q * (t + 1) : cfg.prior.Q * (t + 2)]
        z = z + 0.16 * g + (2 * 0.16) ** 0.5 * xi
    expected = torch.sigmoid(model.decode(z))
    assert torch.allclose(model.generate(u), expected, atol=1e-5)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_kaem_only_tools_refuse_baselines_clearly(runs: dict[str, Path], tmp_path: Path) -> None:
    export = ["--checkpoint", str(runs["vae"]), "--model-repository", str(tmp_path / "repo")]
    plot = ["--checkpoint", str(runs["lebm"]), "--out", str(tmp_path / "p.png")]
    for module, args in (("export.to_onnx", export), ("training.cli.plot_prior", plot)):
        r = _cli(module, *args)
        assert r.returncode == 2, r.stderr
        assert "baseline, not a KAEM" in r.stderr and "Traceback" not in r.stderr
    r = _cli("training.train", "--preset", "digits", "--model", "vae", "--posterior", "thermo", "--dry-run")
    assert r.returncode == 2 and "--posterior applies to KAEM only" in r.stderr


def test_kaem_compare_trains_scores_and_reuses(tmp_path: Path) -> None:
    from training.cli import compare as compare_cli
    from training.eval import features

    net, acc = features.train_feature_net("digits", epochs=3, progress=False)
    feat = features.save_feature_net(tmp_path / "digits.pt", net, "digits", acc, 3, 0)
    argv = ["--preset", "digits", "--steps", "4", "--n", "120", "--features", str(feat), "--out",
            str(tmp_path / "cmp"), "--no-progress"]
    assert compare_cli.main(argv) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    for label in ("KAEM (IS)", "VAE", "latent EBM"):
        assert f"| {label} | 4 |" in table
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["kaem", "vae", "lebm"]
    for r in rows:
        assert r["fd_clf"] > 0 and 0 <= r["precision_clf"] <= 1 and r["images_per_s"] > 0 and r["train_seconds"] > 0
    mtime = (tmp_path / "cmp" / "kaem" / "ckpt-0000004.pt").stat().st_mtime
    assert compare_cli.main(argv) == 0  # second call: checkpoints reused, not retrained
    assert (tmp_path / "cmp" / "kaem" / "ckpt-0000004.pt").stat().st_mtime == mtime


@pytest.mark.slow
def test_kaem_compare_at_equal_wall_clock_with_lr_sweep(tmp_path: Path) -> None:
    from training.cli import compare as compare_cli
    from training.eval import features

    net, acc = features.train_feature_net("digits", epochs=3, progress=False)
    feat = features.save_feature_net(tmp_path / "digits.pt", net, "digits", acc, 3, 0)
    minutes = 0.05
    argv = ["--preset", "digits", "--minutes", str(minutes), "--lr-sweep", "--n", "120", "--sweep-n", "120",
            "--features", str(feat), "--out", str(tmp_path / "cmp"), "--no-progress"]
    assert compare_cli.main(argv) == 0
    out = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    meta, rows = out["meta"], out["rows"]
    assert [r["model"] for r in rows] == ["kaem", "vae", "lebm"] and meta["minutes"] == minutes
    for r in rows:
        plan = json.loads((tmp_path / "cmp" / f"{r['model']}-{minutes:g}min" / "budget.json").read_text())
        # the schedule is sized from the measured step time, and the run stopped at the budget or the plan
        assert plan["finished"] and plan["steps"] == max(10, int(0.9 * 60 * minutes / plan["seconds_per_step"]))
        assert 0 < r["updates"] <= plan["steps"] and r["train_seconds"] < 60 * minutes + 5
        assert r["planned_steps"] == plan["steps"]
        assert r["fd_clf"] > 0 and (r["fd_clf_blur_px"] is None or r["fd_clf_blur_px"] >= 0)
    assert rows[0]["gen_dim"] > 0 and rows[1]["gen_dim"] > 0 and rows[2]["gen_dim"] is None  # LEBM: n/a
    preset_lr = get_preset("digits").train.lr
    for name in ("vae", "lebm"):  # each baseline swept at x0.3, x1, x3 and trained at the lowest FD-clf's lr
        sweep = meta["sweeps"][name]
        assert [s["factor"] for s in sweep] == [0.3, 1.0, 3.0]
        best = min(sweep, key=lambda s: s["fd_clf"])
        assert meta["lr_factors"][name] == best["factor"]
        assert next(r for r in rows if r["model"] == name)["lr"] == pytest.approx(preset_lr * best["factor"])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "equal wall clock" in table and "Best per metric: FD-clf:" in table and "Blur ladder" in table
    assert "Learning-rate sweeps" in table and "| latent EBM |" in table

    ckpt = Path(rows[0]["checkpoint"])
    mtime = ckpt.stat().st_mtime
    assert compare_cli.main(argv) == 0  # finished runs and sweeps are reused, not retrained
    assert ckpt.stat().st_mtime == mtime

    # Another data set reuses the chosen factors; wrong combinations are user errors, not tracebacks.
    reuse = ["--preset", "digits", "--minutes", str(minutes), "--models", "vae", "--n", "120", "--features", str(feat),
             "--out", str(tmp_path / "cmp2"), "--no-progress", "--lr-from", str(tmp_path / "cmp" / "comparison.json")]
    assert compare_cli.main(reuse) == 0
    row = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["rows"][0]
    assert row["lr"] == pytest.approx(preset_lr * meta["lr_factors"]["vae"])
    for bad in (["--steps", "5", "--lr-sweep"], ["--minutes", "1", "--lr-sweep", "--lr-from", "x.json"],
                ["--minutes", "1", "--lr-from", str(tmp_path / "missing.json")], ["--minutes", "-1"]):
        r = _cli("training.cli.compare", "--preset", "digits", *bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_the_planned_step_time_includes_the_loops_periodic_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """kaem-compare --minutes sizes a schedule by seconds_per_step: the loop's latent health (every log line) and
    checkpoints (every checkpoint_every steps) count in it, spread over the steps between them."""
    import time

    import training.eval.health as health
    from training.compare import seconds_per_step

    cfg = get_preset("digits")
    cfg = replace(cfg, train=replace(cfg.train, log_every=2, checkpoint_every=10_000))
    monkeypatch.setattr(health, "latent_health", lambda model: time.sleep(0.4))
    assert seconds_per_step(with_overrides(cfg, steps=100), torch.device("cpu"), None, n=2) >= 0.2
