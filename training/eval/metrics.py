"""Sample-quality metrics on feature matrices (Fréchet distance, KID, k-NN precision/recall, the 1/n
extrapolation to n = ∞) and Inception-v3 features from a user-supplied weight file (never downloaded)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.errors import EvalError
from training.io import load_torch_file

Features = np.ndarray | Tensor  # [N, D] feature matrix, any float dtype; statistics run in float64

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_EXPECTED = (
    f"pytorch-fid's {INCEPTION_FILE} (or torch-fidelity's weights-inception-2015-12-05-6726825d.pth, same keys): "
    "a state dict of the FID Inception-v3 with keys such as 'Conv2d_1a_3x3.conv.weight' [32, 3, 3, 3] and "
    "'fc.weight' [1008, 2048]. Nothing is downloaded: fetch it yourself, e.g. from pytorch-fid's GitHub releases"
)
# A few keys (and shapes) every FID Inception state dict has: a cheap check before building the network.
_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
              "fc.weight": (1008, 2048)}


def _f64(x: Features) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"expected a feature matrix [N >= 2, D], got shape {a.shape}")
    return a


def _pair(a: Features, b: Features) -> tuple[np.ndarray, np.ndarray]:
    a, b = _f64(a), _f64(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return a, b


# ---- Fréchet distance and KID ---------------------------------------------------------------------------


def frechet_distance(feats_a: Features, feats_b: Features) -> float:
    """||mu_a - mu_b||² + Tr(C_a + C_b - 2 (C_a C_b)^½) between Gaussians fitted to two feature sets."""
    a, b = _pair(feats_a, feats_b)
    if len(b) > len(a):
        a, b = b, a  # symmetric; b is now the smaller set, the one whose Gram form may be used below
    y = b - b.mean(0)
    c_a, c_b = np.atleast_2d(np.cov(a, rowvar=False)), y.T @ y / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c_a) + np.trace(c_b)
                 - 2.0 * _trace_sqrt_product(c_a, y))


def _trace_sqrt_product(c_a: np.ndarray, y: np.ndarray) -> float:
    """Tr (C_a C_b)^½ for C_b = yᵀy / (n-1), y the centred ``[n, d]`` samples, through a symmetric PSD
    matrix with the same non-zero eigenvalues (so symmetric eigensolvers, no complex sqrtm): the n×n
    y C_a yᵀ / (n-1) when n - 1 < d (few samples, wide features), else C_a^½ C_b C_a^½."""
    n, d = y.shape
    if n - 1 < d:
        m = y @ c_a @ y.T / (n - 1)
    else:
        w, v = np.linalg.eigh(c_a)
        root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        m = root_a @ (y.T @ y / (n - 1)) @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³ (Binkowski et al. 2018)."""
    d, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def kid(feats_a: Features, feats_b: Features, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of unbiased MMD² over ``subsets`` random subset pairs.

    ``subset_size`` is capped at the smaller set; subsets are drawn without replacement, seeded."""
    a, b = _pair(feats_a, feats_b)
    m = min(subset_size, len(a), len(b))
    if subsets < 1 or m < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {m}")
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# ---- Precision and recall (Kynkäänniemi et al. 2019) ------------------------------------------------------


def _kth_radius(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cat([torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside(query: Tensor, ref: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each query point lies in some ball (ref_j, radii_j): the k-NN manifold estimate."""
    return torch.cat([(torch.cdist(query[i : i + chunk], ref) <= radii).any(1) for i in range(0, len(query), chunk)])


def precision_recall(real: Features, fake: Features, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Precision: share of fake samples inside the real k-NN manifold; recall: real inside the fake one."""
    r, f = (torch.from_numpy(x) for x in _pair(real, fake))
    if not 1 <= k < min(len(r), len(f)):
        raise ValueError(f"k must be in 1..{min(len(r), len(f)) - 1} for sets of {len(r)} and {len(f)}, got {k}")
    precision = _inside(f, r, _kth_radius(r, k, chunk), chunk).double().mean()
    recall = _inside(r, f, _kth_radius(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


# ---- Extrapolation to n = ∞ (Chong & Forsyth 2020) ----------------------------------------------------------


def infinity_ns(n: int, lo: int = 1000, hi: int = 3000, step: int = 200) -> list[int]:
    """Subset sizes for the 1/n fit: ``lo, lo+step, ..., hi`` when n >= hi, else the same grid scaled by n/hi."""
    grid = np.arange(lo, hi + 1, step, dtype=np.float64) * min(1.0, n / hi)
    ns = sorted({int(round(v)) for v in grid if round(v) >= 2})
    if len(ns) < 2:
        raise ValueError(f"n = {n} generated images is too few to extrapolate to infinity")
    return ns


def extrapolate_infinity(ns: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares fit of value = a + b/n; returns a, the value extrapolated to n = ∞."""
    x = 1.0 / np.asarray(ns, dtype=np.float64)
    if len(x) != len(values) or len(np.unique(x)) < 2:
        raise ValueError("need values at two or more distinct n")
    return float(np.polyfit(x, np.asarray(values, dtype=np.float64), 1)[1])


def metric_at_infinity(metric: Callable[[np.ndarray, np.ndarray], float], real: Features, fake: Features,
                       ns: Sequence[int], seed: int = 0) -> tuple[float, list[float]]:
    """``metric(real, fake[random n-subset])`` for each n in ``ns`` against the full real set, and the
    intercept of its fit in 1/n: (value at ∞, values at each n)."""
    r, f = _pair(real, fake)
    if max(ns) > len(f):
        raise ValueError(f"subset size {max(ns)} exceeds the {len(f)} generated samples")
    rng = np.random.default_rng(seed)
    values = [metric(r, f[rng.choice(len(f), n, replace=False)]) for n in ns]
    return extrapolate_infinity(ns, values), values


# ---- Inception-v3 features from a local weight file ---------------------------------------------------------


def load_inception(weights_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """torchmetrics' FID Inception-v3 (2048-d pool features, TF-compatible resize) with local weights.

    The file is read with ``weights_only=True`` and checked here; torch-fidelity's own loader then gets an
    in-memory copy, never the path (it unpickles with ``weights_only=False`` and downloads if given None)."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:  # torchmetrics and torch-fidelity come with the "eval" extra
        raise EvalError(f"FID needs torchmetrics and torch-fidelity ({err}): pip install 'kaem-serve[eval]'") from err

    path = Path(weights_path)
    try:
        state = load_torch_file(path, "Inception weights", EvalError)
    except EvalError as err:
        raise EvalError(f"{err}; expected {INCEPTION_EXPECTED}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EvalError(f"{path} is not a state dict of tensors; expected {INCEPTION_EXPECTED}")
    wrong = [k for k, shape in _SIGNATURE.items() if k not in state or tuple(state[k].shape) != shape]
    if wrong:
        raise EvalError(f"{path} is not the FID Inception-v3 (missing or misshapen: {', '.join(wrong)}); "
                        f"expected {INCEPTION_EXPECTED}")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=buf, antialias=False)  # type: ignore[arg-type]
    except RuntimeError as err:  # strict load_state_dict: other keys missing, unexpected or misshapen
        raise EvalError(f"{path} does not fit the FID Inception-v3 ({str(err)[:300]}); "
                        f"expected {INCEPTION_EXPECTED}") from err
    return net.to(device)


@torch.no_grad()
def inception_features(images: np.ndarray | Tensor, weights_path: str | Path | nn.Module, batch: int = 64,
                       device: str | torch.device = "cpu", desc: str = "Inception features",
                       progress: bool = True) -> np.ndarray:
    """float64 2048-d Inception pool features ``[N, 2048]``.

    ``images``: uint8 ``[N, H, W, C]`` (as generated) or float ``[N, C, H, W]`` in [0, 1] (as loaded);
    grey images are repeated to RGB. ``weights_path``: the weight file, or a net from :func:`load_inception`."""
    from training.model.kaem import to_uint8_nhwc

    net = weights_path if isinstance(weights_path, nn.Module) else load_inception(weights_path, device)
    dev = next(net.parameters()).device
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images [N, H, W, C] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = to_uint8_nhwc(x.float())
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels last, got shape {tuple(x.shape)}")
    out = []
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch", disable=not progress, dynamic_ncols=True,
                  mininterval=1.0):
        chunk = x[i : i + batch].permute(0, 3, 1, 2).to(dev)
        out.append(net(chunk.expand(-1, 3, -1, -1).contiguous()).double().cpu())
    return torch.cat(out).numpy()
