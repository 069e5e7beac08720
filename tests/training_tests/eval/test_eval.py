"""Evaluation: the digits feature classifier, classifier-space metrics separating real from blurred and
noise images, the Inception path on a random-weight Inception built here, and kaem-eval end to end."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from testpaths import ROOT
from torch import nn

from training.cli.evaluate import main
from training.data.datasets import DataError, load_dataset
from training.errors import EvalError
from training.eval import metrics
from training.eval.evaluate import evaluate
from training.eval.features import (
    FeatureNet,
    accuracy,
    classifier_features,
    labelled_dataset,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from training.model.kaem import to_uint8_nhwc

DATA = ROOT / "data"


def _digits_uint8(split: str) -> np.ndarray:
    return to_uint8_nhwc(load_dataset("digits", None, split).images.float() / 255.0).numpy()


def _blur(x: np.ndarray) -> np.ndarray:
    """3×3 binomial blur of uint8 [N, H, W, C] images (replicate padding)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16.0)[None, None]
    t = nn.functional.conv2d(nn.functional.pad(t, (1, 1, 1, 1), mode="replicate"), k)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small convs on a shared 2-core box: a second intra-op thread mostly spins. Measured under load: the
    digits classifier 25 s -> 2 s, the Inception test 42 s -> 5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, acc = train_feature_net("digits", epochs=10, seed=0, progress=False)  # 96.6% test accuracy
    return save_feature_net(tmp_path_factory.mktemp("features") / "digits.pt", net, "digits", acc, 10, 0)


def test_feature_net_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    """The classifier's init comes from ``seed`` alone (the same weights as seeding the global RNG, so cached
    classifiers stay valid), and the caller's global RNG stream is not reset."""
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    net, _ = train_feature_net("digits", epochs=0, seed=7, progress=False)
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(7)
    reference = FeatureNet(net.shape, net.head.out_features)
    for (name, got), (_, want) in zip(net.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(got, want), name


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import get_preset, with_overrides
    from training.train import train

    cfg = with_overrides(get_preset("digits"), steps=20, seed=0)
    return train(cfg, tmp_path_factory.mktemp("run"), torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's FID Inception-v3, randomly initialised (no download), saved as a plain state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: object, **kwargs: object) -> None:  # skip the constructor's load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):  # the default init gives near-constant pool features
            nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / metrics.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


# ---- The feature classifier ------------------------------------------------------------------------------


def test_feature_file_round_trip(digits_features: Path) -> None:
    net = load_feature_net(digits_features)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.meta["dataset"] == "digits" and net.meta["feature_dim"] == 128 and net.meta["epochs"] == 10
    assert net.meta["test_accuracy"] > 0.9  # measured 0.966 (10 epochs on 1,500 images)
    assert accuracy(net, "digits", progress=False) == net.meta["test_accuracy"]
    raw = torch.load(digits_features, weights_only=True)
    assert raw["image_shape"] == [1, 8, 8]
    f = classifier_features(net, _digits_uint8("test"), batch=100, progress=False)
    assert f.shape == (297, 128) and f.dtype == np.float64 and np.isfinite(f).all()
    assert np.array_equal(f, classifier_features(net, _digits_uint8("test"), batch=297, progress=False))
    assert not list(digits_features.parent.glob(".*tmp*"))  # atomic write left no temp file


def test_feature_file_errors(digits_features: Path, digits_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="feature classifier not found"):
        load_feature_net(tmp_path / "nope.pt")
    with pytest.raises(EvalError, match="not a feature-classifier file"):
        load_feature_net(digits_checkpoint)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(digits_features.read_bytes()[:500])
    with pytest.raises(EvalError, match="cannot read"):
        load_feature_net(garbage)
    with pytest.raises(DataError, match="no class labels"):
        labelled_dataset("celeba", tmp_path, "train")


@pytest.mark.skipif(not (DATA / "FashionMNIST" / "raw").is_dir(), reason="needs data/ from `make setup`")
def test_fmnist_labels_align_with_images() -> None:
    import torchvision

    images, labels = labelled_dataset("fmnist", DATA, "test")
    ref = torchvision.datasets.FashionMNIST(str(DATA), train=False, download=False)
    assert torch.equal(images.images[:, 0], ref.data) and torch.equal(labels, ref.targets)
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_colour_labels_and_net_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_fixtures import TEST_READERS, write_cifar10, write_svhn

    from training.data import datasets as data

    for name, cls in TEST_READERS.items():
        monkeypatch.setitem(data.READERS, name, cls)
    write_svhn(tmp_path, "train", np.random.default_rng(0).integers(0, 256, (32, 32, 3, 12), dtype=np.uint8))
    write_cifar10(tmp_path, np.random.default_rng(1))
    _, svhn = labelled_dataset("svhn", tmp_path, "train")
    assert svhn.tolist() == [(i % 10 + 1) % 10 for i in range(12)]  # .mat labels 1..10, 10 meaning digit 0
    images, cifar = labelled_dataset("cifar10", tmp_path, "train")
    assert cifar.tolist() == [0, 1] * 5 and len(images) == 10
    for shape in [(1, 28, 28), (1, 8, 8), (3, 32, 32), (3, 64, 64)]:
        assert FeatureNet(shape)(torch.rand(2, *shape)).shape == (2, 128)
    with pytest.raises(ValueError, match="expects images"):
        FeatureNet((1, 8, 8))(torch.rand(2, 1, 28, 28))


# ---- Classifier-space metrics separate real from degraded images ---------------------------------------


def test_classifier_metrics_separate_real_blurred_noise(digits_features: Path) -> None:
    net = load_feature_net(digits_features)
    train, test = _digits_uint8("train"), _digits_uint8("test")
    noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    f_train, f_test, f_blur, f_noise = (classifier_features(net, x, progress=False)
                                        for x in (train, test, _blur(test), noise))
    fd_real, fd_blur, fd_noise = (metrics.frechet_distance(f_train, f) for f in (f_test, f_blur, f_noise))
    # Measured: real 2.4, blurred 54.6, noise 85.1.
    assert fd_real < fd_blur < fd_noise
    assert fd_blur > 10 * fd_real
    kid_real, kid_blur, kid_noise = (metrics.kid(f_train, f, 20, 200, seed=0)[0] for f in (f_test, f_blur, f_noise))
    assert kid_blur > 20 * kid_real and kid_noise > 20 * kid_real  # measured 0.51, 45.4, 24.7
    p_real, r_real = metrics.precision_recall(f_train, f_test)
    p_noise, r_noise = metrics.precision_recall(f_train, f_noise)
    assert p_real > 0.8 and r_real > 0.8 and r_noise < 0.2  # measured 0.93/0.94 and 0.34/0.02


def test_evaluate_with_pluggable_generator(digits_features: Path) -> None:
    test = _digits_uint8("test")

    def replay(n: int) -> np.ndarray:  # a "generator" that returns the real test images themselves
        return test[:n]

    rep = evaluate(None, "digits", 297, generate=replay, features=digits_features, kid_subsets=5,
                   kid_subset_size=100, progress=False)
    # Identical sets: 0 up to the sqrt of numerically-zero eigenvalues (dead ReLU units), vs 2.4 train-vs-test.
    assert rep["n_real"] == 297 and abs(rep["fd_clf"]) < 1e-4
    assert rep["precision_clf"] == rep["recall_clf"] == 1.0
    noisy = evaluate(None, "digits", 297, generate=lambda n: np.random.default_rng(1).integers(
        0, 256, (n, 8, 8, 1), dtype=np.uint8), features=digits_features, kid_subsets=5, kid_subset_size=100,
        progress=False)
    assert noisy["fd_clf"] > 50 and noisy["kid_clf"] > 5 * noisy["kid_clf_std"]
    with pytest.raises(ValueError, match="uint8 images"):
        evaluate(None, "digits", 10, generate=lambda n: test[:n, :4], features=digits_features, progress=False)


def test_blur_and_blur_equivalent() -> None:
    from training.eval.evaluate import blur, blur_equivalent

    images = _digits_uint8("test")[:50]
    assert blur(images, 0.0) is images
    soft = blur(images, 1.0)
    assert soft.dtype == np.uint8 and soft.shape == images.shape
    assert soft.astype(float).std() < images.astype(float).std()  # smoothing lowers the contrast
    flat = np.full((2, 8, 8, 1), 77, dtype=np.uint8)
    assert np.array_equal(blur(flat, 1.5), flat)  # a normalised kernel with reflected edges keeps a constant
    ladder = [{"sigma": 0.0, "fd_clf": 1.0}, {"sigma": 0.7, "fd_clf": 80.0}, {"sigma": 1.0, "fd_clf": 170.0}]
    assert blur_equivalent(125.0, ladder) == pytest.approx(0.85)
    assert blur_equivalent(80.0, ladder) == pytest.approx(0.7)
    assert blur_equivalent(0.5, ladder) is None and blur_equivalent(200.0, ladder) is None


# ---- kaem-eval end to end ----------------------------------------------------------------------------------


def test_kaem_eval_end_to_end(digits_checkpoint: Path, digits_features: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    rc = main(["--checkpoint", str(digits_checkpoint), "--n", "64", "--features", str(digits_features),
               "--infinity", "--kid-subsets", "10", "--kid-subset-size", "32", "--no-progress", "--out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    line = lines[0]
    assert line.startswith("digits n=64 step=20 FD-clf=") and line.endswith(f"-> {out}")
    rep = json.loads(out.read_text())
    # Under the summary: the blur ladder (one line per rung), then the latent health.
    assert lines[1].startswith("blur ladder: 64 real training images")
    assert [ln.split()[0] for ln in lines[2:6]] == ["σ=0.0", "σ=0.7", "σ=1.0", "σ=1.5"]
    assert lines[6].startswith("latent PR ") and "generator dimension" in lines[6]
    assert [r["sigma"] for r in rep["blur_ladder"]] == [0.0, 0.7, 1.0, 1.5]
    ladder_fd = [r["fd_clf"] for r in rep["blur_ladder"]]
    assert ladder_fd == sorted(ladder_fd) and ladder_fd[-1] > 5 * ladder_fd[0]  # blurrier real images score worse
    health = rep["latent_health"]
    assert 1 <= health["latent_pr"] <= 9 and health["gen_dim"] > 0 and health["Q"] == 9
    for key in ("fd_clf", "kid_clf", "kid_clf_std", "precision_clf", "recall_clf", "fd_clf_inf", "kid_clf_inf"):
        assert math.isfinite(rep[key]), key
    assert rep["fd_clf"] > 0 and 0 <= rep["precision_clf"] <= 1 and 0 <= rep["recall_clf"] <= 1
    assert "fid" not in rep and rep["inception_weights"] is None  # no Inception file, no FID
    assert (rep["checkpoint"], rep["step"], rep["dataset"], rep["n"], rep["n_real"], rep["generator_seed"]) == (
        str(digits_checkpoint), 20, "digits", 64, 64, 0)
    assert rep["classifier"]["path"] == str(digits_features) and rep["classifier"]["test_accuracy"] > 0.9
    assert rep["infinity"]["ns"] == metrics.infinity_ns(64) and len(rep["infinity"]["fd_clf"]) == 11
    assert rep["infinity"]["fd_clf"][-1] == pytest.approx(rep["fd_clf"])  # the largest subset is all 64
    assert rep["wall_s"]["total"] > 0


def test_kaem_eval_missing_features_is_user_error(digits_checkpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "features" / "digits.pt"
    r = subprocess.run([sys.executable, "-m", "training.cli.evaluate", "--checkpoint", str(digits_checkpoint),
                        "--n", "16", "--features", str(missing), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"kaem-train-features --dataset digits --out {missing}" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r.json").exists()


# ---- Inception FID path (random weights built above; the real file is the user's) --------------------------


def test_inception_path_end_to_end(random_inception: Path, digits_checkpoint: Path, digits_features: Path,
                                   tmp_path: Path) -> None:
    test = _digits_uint8("test")[:3]
    net = metrics.load_inception(random_inception)
    f = metrics.inception_features(test, net, batch=2, progress=False)
    assert f.shape == (3, 2048) and np.isfinite(f).all() and f.std(0).mean() > 0
    as_float = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255.0  # float NCHW in [0, 1] gives the same
    assert np.allclose(metrics.inception_features(as_float, net, batch=3, progress=False), f, atol=1e-5)
    out = tmp_path / "r.json"
    rc = main(["--checkpoint", str(digits_checkpoint), "--n", "4", "--features", str(digits_features),
               "--inception-weights", str(random_inception), "--kid-subsets", "3", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["fid"] > 0 and math.isfinite(rep["kid"]) and rep["inception_weights"] == str(random_inception)


@pytest.mark.parametrize("case", ["missing", "garbage", "unrelated", "incomplete"])
def test_inception_weight_file_errors(case: str, tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    if case == "garbage":
        path.write_text("not a torch file")
    elif case == "unrelated":
        torch.save(nn.Linear(3, 2).state_dict(), path)
    elif case == "incomplete":  # the probed keys with the right shapes, nothing else
        torch.save({k: torch.zeros(s) for k, s in metrics._SIGNATURE.items()}, path)
    expect = {"missing": "Inception weights not found", "garbage": "cannot read Inception weights",
              "unrelated": "is not the FID Inception-v3", "incomplete": "does not fit the FID Inception-v3"}[case]
    with pytest.raises(EvalError, match=expect) as err:
        metrics.load_inception(path)
    assert str(path) in str(err.value) and metrics.INCEPTION_FILE in str(err.value)
