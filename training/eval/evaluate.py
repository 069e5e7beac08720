"""``kaem-eval``: sample quality of a generator against a dataset's test split, in the feature space of a
frozen classifier (FD-clf, KID-clf, precision/recall) and, given the weight file, Inception (FID, KID)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.datasets import image_shape, load_dataset
from training.errors import EvalError
from training.eval import metrics
from training.eval.features import FeatureNet, classifier_features, describe, load_feature_net
from training.eval.health import LatentHealth, latent_health
from training.io import atomic_write_text
from training.model.kaem import LatentImageModel

Generate = Callable[[int], np.ndarray]  # n -> uint8 images [n, H, W, C]
BLUR_SIGMAS = (0.0, 0.7, 1.0, 1.5)  # px: the rungs of the blur ladder


def default_features_path(dataset: str) -> Path:
    return Path("features") / f"{dataset}.pt"


def real_images(dataset: str, n: int, root: str | Path | None = None, seed: int = 0,
                batch: int = 1024, split: str = "test") -> np.ndarray:
    """uint8 ``[min(n, N_split), H, W, C]`` images of a split: all of them, or a seeded random subset in
    index order."""
    from training.data.datasets import fetch
    from training.model.kaem import to_uint8_nhwc

    data = load_dataset(dataset, root, split)
    total = len(data)  # type: ignore[arg-type]
    idx = np.arange(total) if n >= total else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    chunks = [to_uint8_nhwc(fetch(data, idx[i : i + batch].tolist(), torch.device("cpu")))
              for i in range(0, len(idx), batch)]
    return torch.cat(chunks).numpy()


def _check_images(images: np.ndarray, n: int, dataset: str) -> np.ndarray:
    c, h, w = image_shape(dataset)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape != (n, h, w, c):
        raise ValueError(f"generate({n}) must return uint8 images {(n, h, w, c)} for {dataset}, "
                         f"got {images.dtype} {images.shape}")
    return images


def _feature_metrics(real: np.ndarray, fake: np.ndarray, suffix: str, kid_subsets: int, kid_size: int, seed: int,
                     pr: bool) -> dict[str, float]:
    """fd/kid (and precision/recall) between two feature sets; keys end in ``suffix`` ("_clf" or "")."""
    kid_mean, kid_std = metrics.kid(real, fake, kid_subsets, kid_size, seed)
    fd_key = "fd_clf" if suffix == "_clf" else "fid"  # only Inception features earn the name FID
    out = {fd_key: metrics.frechet_distance(real, fake), f"kid{suffix}": kid_mean, f"kid{suffix}_std": kid_std}
    if pr:
        out[f"precision{suffix}"], out[f"recall{suffix}"] = metrics.precision_recall(real, fake)
    return out


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 images ``[N, H, W, C]`` blurred by a Gaussian of ``sigma`` px (kernel ±3σ, reflected edges),
    rounded back to uint8 like generated images; σ = 0 returns them unchanged."""
    if sigma <= 0:
        return images
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(3 * sigma) + 1
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    out = torch.cat([gaussian_blur(x[i : i + 2048], [k, k], [sigma, sigma]) for i in range(0, len(x), 2048)])
    return torch.clamp(torch.floor(out + 0.5), 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def blur_ladder(net: FeatureNet, dataset: str, f_test: np.ndarray, n: int, data_root: str | Path | None,
                seed: int, kid_subsets: int, kid_subset_size: int, batch: int = 256,
                sigmas: Sequence[float] = BLUR_SIGMAS, progress: bool = True) -> list[dict[str, float]]:
    """The scale every score is read against: ``n`` real *training* images blurred by σ px, scored like a
    generator against the same test features ``f_test`` (σ = 0: the best a perfect generator can do
    at this n; each further rung: real images that much blurrier)."""
    train = real_images(dataset, n, data_root, seed, split="train")
    rungs = []
    for sigma in sigmas:
        f_blur = classifier_features(net, blur(train, sigma), batch, f"classifier features (real, blur {sigma} px)",
                                     progress)
        rungs.append({"sigma": sigma, **_feature_metrics(f_test, f_blur, "_clf", kid_subsets, kid_subset_size, seed,
                                                         pr=True)})
    return rungs


def blur_equivalent(fd: float, ladder: Sequence[dict[str, float]]) -> float | None:
    """The blur σ (px) at which real images score this FD-clf, by linear interpolation between rungs;
    None outside the ladder (better than σ = 0 or worse than its last rung)."""
    pts = sorted((r["fd_clf"], r["sigma"]) for r in ladder)
    for (f0, s0), (f1, s1) in zip(pts[:-1], pts[1:], strict=True):
        if f0 <= fd <= f1:
            return s0 if f1 == f0 else s0 + (s1 - s0) * (fd - f0) / (f1 - f0)
    return None


def _inf_subsets(kid_subsets: int) -> int:
    """KID subsets per point of the ∞ fit: a tenth of ``kid_subsets``, at least 10 (or all, if fewer)."""
    return min(kid_subsets, max(10, kid_subsets // 10))


def _infinity(real: np.ndarray, fake: np.ndarray, suffix: str, ns: Sequence[int], kid_subsets: int, kid_size: int,
              seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """FD and KID on random n-subsets of the generated features, extrapolated to n = ∞ (fit in 1/n).

    KID is unbiased, so its ∞ value is a consistency check; it uses a tenth of the subsets per point."""
    fd_key = "fd_clf" if suffix == "_clf" else "fid"
    fd_inf, fd_curve = metrics.metric_at_infinity(metrics.frechet_distance, real, fake, ns, seed)
    kid_at = lambda r, f: metrics.kid(r, f, _inf_subsets(kid_subsets), kid_size, seed)[0]  # noqa: E731
    kid_inf, kid_curve = metrics.metric_at_infinity(kid_at, real, fake, ns, seed)
    return ({f"{fd_key}_inf": fd_inf, f"kid{suffix}_inf": kid_inf},
            {fd_key: fd_curve, f"kid{suffix}": kid_curve})


def evaluate(model: LatentImageModel | None, dataset: str, n: int = 10_000, *, generate: Generate | None = None,
             data_root: str | Path | None = None, features: str | Path | None = None,
             inception_weights: str | Path | None = None, infinity: bool = False,
             infinity_ns: Sequence[int] | None = None, batch: int = 256, device: str | torch.device = "cpu",
             seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
             ladder: bool = True, health: bool = True, progress: bool = True) -> dict[str, Any]:
    """Metrics of ``n`` generated images against up to ``n`` test images of ``dataset``; a flat JSON-able dict.

    ``generate(n)`` returns uint8 ``[n, H, W, C]`` (any generator); by default the
    ``model`` with seeds ``seed .. seed+n-1``. ``features``: classifier file (default features/<dataset>.pt).
    ``inception_weights``: adds FID/KID. ``infinity``: adds the ∞ versions, fitted over ``infinity_ns``
    (default :func:`metrics.infinity_ns` of n). ``seed`` also picks the real subset and KID subsets.
    ``ladder``: adds the blur ladder (real training images blurred by σ px, same metrics) and the
    blur-equivalent σ of the FD-clf; ``health``: adds the model's latent health (training.eval.health)."""
    from training.sample import sample_images

    if generate is None:
        if model is None:
            raise ValueError("pass a model or a generate(n) callable")
        generate = lambda k: sample_images(model, range(seed, seed + k), batch=batch)  # noqa: E731
    ns = list(infinity_ns or metrics.infinity_ns(n)) if infinity else []
    times: dict[str, float] = {}

    # ---- Fail fast: the classifier (and Inception) files before any generation --------------------
    feat_path = Path(features) if features is not None else default_features_path(dataset)
    if not feat_path.is_file():
        raise EvalError(f"feature classifier {feat_path} not found: train it once with "
                        f"`kaem-train-features --dataset {dataset} --out {feat_path}`")
    net = load_feature_net(feat_path, device)
    if net.meta["dataset"] != dataset:
        raise EvalError(f"{feat_path} is a {net.meta['dataset']} classifier, but the model is evaluated on {dataset}")
    inception = metrics.load_inception(inception_weights, device) if inception_weights is not None else None

    # ---- Images: real test split and generated -----------------------------------------------------
    t0 = time.perf_counter()
    real = real_images(dataset, n, data_root, seed)
    times["load_real"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        fake = _check_images(generate(n), n, dataset)
    times["generate"] = time.perf_counter() - t0

    # ---- Classifier space ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    f_real = classifier_features(net, real, batch, "classifier features (real)", progress)
    f_fake = classifier_features(net, fake, batch, "classifier features (generated)", progress)
    report: dict[str, Any] = _feature_metrics(f_real, f_fake, "_clf", kid_subsets, kid_subset_size, seed, pr=True)
    curves: dict[str, list[float]] = {}
    if ns:
        inf, curve = _infinity(f_real, f_fake, "_clf", ns, kid_subsets, kid_subset_size, seed)
        report.update(inf)
        curves.update(curve)
    times["classifier_metrics"] = time.perf_counter() - t0
    if ladder:
        t0 = time.perf_counter()
        report["blur_ladder"] = blur_ladder(net, dataset, f_real, n, data_root, seed, kid_subsets, kid_subset_size,
                                            batch, progress=progress)
        report["fd_clf_blur_px"] = blur_equivalent(report["fd_clf"], report["blur_ladder"])
        times["blur_ladder"] = time.perf_counter() - t0
    if health and model is not None and hasattr(model, "latent_of_u"):
        t0 = time.perf_counter()
        report["latent_health"] = latent_health(model).to_dict()
        times["latent_health"] = time.perf_counter() - t0

    # ---- Inception space (only with the user's weight file) ---------------------------------------------
    if inception is not None:
        t0 = time.perf_counter()
        i_real = metrics.inception_features(real, inception, batch, desc="Inception features (real)", progress=progress)
        i_fake = metrics.inception_features(fake, inception, batch, desc="Inception features (generated)",
                                            progress=progress)
        report.update(_feature_metrics(i_real, i_fake, "", kid_subsets, kid_subset_size, seed, pr=False))
        if ns:
            inf, curve = _infinity(i_real, i_fake, "", ns, kid_subsets, kid_subset_size, seed)
            report.update(inf)
            curves.update(curve)
        times["inception_metrics"] = time.perf_counter() - t0

    report.update({
        "dataset": dataset, "n": n, "n_real": len(real), "generator_seed": seed,
        "classifier": {"path": str(feat_path), **describe(net)},
        "inception_weights": str(inception_weights) if inception_weights is not None else None,
        "kid_subsets": kid_subsets, "kid_subset_size": min(kid_subset_size, len(real), n),
        "wall_s": {k: round(v, 3) for k, v in times.items()},
    })
    if ns:
        report["infinity"] = {"ns": ns, "kid_subsets": _inf_subsets(kid_subsets), **curves}
    return report


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Atomic write (temp file + rename)."""
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def summary(report: dict[str, Any]) -> str:
    """One line: the headline numbers of a report."""
    parts = [f"{report['dataset']} n={report['n']}"]
    if "step" in report:
        parts.append(f"step={report['step']}")
    parts.append(f"FD-clf={report['fd_clf']:.3f} KID-clf={report['kid_clf']:.5f}±{report['kid_clf_std']:.5f} "
                 f"P-clf={report['precision_clf']:.3f} R-clf={report['recall_clf']:.3f}")
    if "fid" in report:
        parts.append(f"FID={report['fid']:.3f} KID={report['kid']:.5f}")
    labels = {"fd_clf_inf": "FD-clf∞", "kid_clf_inf": "KID-clf∞", "fid_inf": "FID∞", "kid_inf": "KID∞"}
    parts += [f"{label}={report[k]:.5g}" for k, label in labels.items() if k in report]
    if report.get("fd_clf_blur_px") is not None:
        parts.append(f"(FD-clf of real images blurred by {report['fd_clf_blur_px']:.2f} px)")
    return " ".join(parts)


def details(report: dict[str, Any]) -> list[str]:
    """The lines printed under the summary: the blur ladder every score is read against, then the latent
    health with its warnings."""
    lines = []
    if "blur_ladder" in report:
        lines.append(f"blur ladder: {report['n']} real training images blurred by σ px vs the same test images")
        for r in report["blur_ladder"]:
            lines.append(f"  σ={r['sigma']:.1f} px  FD-clf={r['fd_clf']:8.2f}  KID-clf={r['kid_clf']:9.4f}  "
                         f"P-clf={r['precision_clf']:.3f}  R-clf={r['recall_clf']:.3f}")
    if "latent_health" in report:
        h = report["latent_health"]
        health = LatentHealth(h["latent_pr"], tuple(h["latent_top3"]), h["gen_dim"], h["Q"])
        lines.append(health.summary())
        lines += [f"warning: {w}" for w in health.warnings()]
    return lines
