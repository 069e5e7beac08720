"""A small CNN classifier per dataset, trained once and frozen, whose penultimate activations are the
feature space of the classifier metrics (FD-clf, KID-clf, precision/recall); ``kaem-train-features``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from training.data.datasets import DataError, default_data_root, image_shape, load_dataset
from training.errors import EvalError
from training.io import load_torch_file, save_torch_file
from training.model.decoder import seeded_build

FORMAT = "kaem-features"
FORMAT_VERSION = 1
FEATURE_DIM = 128
CLASSES = {"fmnist": 10, "mnist": 10, "digits": 10, "svhn": 10, "cifar10": 10}


class FeatureNet(nn.Module):
    """conv-relu-pool blocks -> flatten -> ``feature_dim`` ReLU features -> class logits.

    ``forward`` maps float images ``[N, C, H, W]`` in [0, 1] to the features; ``logits`` to the classes.
    Two blocks for images up to 32 pixels, three above; pooling stops at a 2x2 map (8x8 digits), so the
    flattened map is 64x7x7 (28 px), 64x8x8 (32 px), 128x8x8 (64 px) or 64x2x2 (digits)."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        c, h, _ = shape
        self.shape = tuple(shape)
        widths = (32, 64) if h <= 32 else (32, 64, 128)
        layers: list[nn.Module] = []
        side = h
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
            if side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c = w
        self.conv = nn.Sequential(*layers, nn.Flatten())  # no global pooling: it cost fmnist 8 points
        self.fc = nn.Sequential(nn.Linear(c * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, n_classes)
        self.feature_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"feature net expects images {self.shape}, got {tuple(x.shape[1:])}")
        return self.fc(self.conv(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))


# ---- Labelled data: the images of training.data.datasets plus the labels its readers also hold ---------------


def labelled_dataset(name: str, root: str | Path | None, split: str) -> tuple[Dataset, Tensor]:
    """(images exactly as :func:`training.data.datasets.load_dataset` gives them, int64 labels in the same order)."""
    image_shape(name)  # DataError for an unknown name
    if name not in CLASSES:
        raise DataError(f"{name} has no class labels in this project (its reader loads images only), so no "
                        f"feature classifier can be trained for it; datasets with labels: {', '.join(CLASSES)}")
    images = load_dataset(name, root, split)  # validates split and files (DataError names them)
    if name == "digits":
        labels = _digits_labels(split)
    elif name in ("fmnist", "mnist"):
        import torchvision

        cls = torchvision.datasets.FashionMNIST if name == "fmnist" else torchvision.datasets.MNIST
        labels = cls(str(root or default_data_root()), train=split == "train", download=False).targets
    else:  # svhn / cifar10: ImagesOnly wraps the torchvision dataset, which holds the labels
        base = images.base  # type: ignore[attr-defined]
        labels = torch.as_tensor(base.labels if name == "svhn" else base.targets)
    labels = torch.as_tensor(labels, dtype=torch.long)
    assert len(labels) == len(images), (len(labels), len(images))  # type: ignore[arg-type]
    return images, labels


def _digits_labels(split: str) -> Tensor:
    from sklearn.datasets import load_digits

    from training.data.datasets import DIGITS_SPLIT_SEED, DIGITS_TRAIN

    y = load_digits().target  # the same seeded permutation as training.data.datasets._digits
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    return torch.from_numpy(y[order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]])


def _batch(dataset: Dataset, idx: Tensor) -> Tensor:
    from training.data.datasets import fetch

    return fetch(dataset, idx.tolist(), torch.device("cpu"))


# ---- Training, evaluation, file I/O -----------------------------------------------------------------


def train_feature_net(dataset: str, root: str | Path | None = None, epochs: int = 1, batch: int = 128,
                      lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                      progress: bool = True) -> tuple[FeatureNet, float]:
    """Train a classifier with Adam on the train split for ``epochs`` passes, seeded (init and order);
    returns (frozen eval-mode net, test accuracy in [0, 1])."""
    device = torch.device(device)
    train_x, train_y = labelled_dataset(dataset, root, "train")
    n = len(train_y)
    net = seeded_build(seed, lambda: FeatureNet(image_shape(dataset), CLASSES[dataset])).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((n + batch - 1) // batch)
    with tqdm(total=steps, desc=f"train {dataset} classifier", unit="batch", disable=not progress,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=gen).split(batch):
                x, y = _batch(train_x, idx).to(device), train_y[idx].to(device)
                loss = nn.functional.cross_entropy(net.logits(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
    net.requires_grad_(False).eval()
    return net, accuracy(net, dataset, root, "test", progress=progress)


@torch.no_grad()
def accuracy(net: FeatureNet, dataset: str, root: str | Path | None = None, split: str = "test",
             batch: int = 512, progress: bool = True) -> float:
    """Fraction of split ``split`` classified correctly."""
    x, y = labelled_dataset(dataset, root, split)
    device = next(net.parameters()).device
    correct = 0
    for idx in tqdm(torch.arange(len(y)).split(batch), desc=f"{split} accuracy", unit="batch", disable=not progress,
                    dynamic_ncols=True, mininterval=1.0):
        correct += int((net.logits(_batch(x, idx).to(device)).argmax(1).cpu() == y[idx]).sum())
    return correct / len(y)


def save_feature_net(path: str | Path, net: FeatureNet, dataset: str, accuracy: float, epochs: int,
                     seed: int) -> Path:
    """Atomic write (temp file + rename) of weights and metadata; loadable with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": dataset,
        "image_shape": list(net.shape), "n_classes": net.head.out_features, "feature_dim": net.feature_dim,
        "test_accuracy": float(accuracy), "epochs": int(epochs), "seed": int(seed),
        "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
    }
    return save_torch_file(path, payload)


def load_feature_net(path: str | Path, map_location: str | torch.device = "cpu") -> FeatureNet:
    """The frozen eval-mode classifier in ``path``; its metadata is in ``net.meta`` (dataset, accuracy...).

    Every failure (missing, unreadable, foreign or incomplete file) is an
    :class:`~training.errors.EvalError` naming it."""
    path = Path(path)
    blob = load_torch_file(path, "feature classifier", EvalError, map_location)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise EvalError(f"{path} is not a feature-classifier file (no '{FORMAT}' format marker); "
                        "write one with kaem-train-features")
    if not isinstance(blob.get("format_version"), int) or blob["format_version"] > FORMAT_VERSION:
        raise EvalError(f"{path} has format version {blob.get('format_version')}, newer than this software "
                        f"supports ({FORMAT_VERSION}): upgrade kaem-serve")
    try:
        net = FeatureNet(tuple(blob["image_shape"]), int(blob["n_classes"]), int(blob["feature_dim"]))
        net.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise EvalError(f"{path}: incomplete or inconsistent feature-classifier file ({str(err)[:200]})") from err
    net.meta = {k: v for k, v in blob.items() if k != "state_dict"}  # type: ignore[assignment]
    return net.to(map_location).requires_grad_(False).eval()


@torch.no_grad()
def classifier_features(net: FeatureNet, images: np.ndarray | Tensor, batch: int = 256,
                        desc: str = "classifier features", progress: bool = True) -> np.ndarray:
    """float64 features ``[N, feature_dim]`` of uint8 images ``[N, H, W, C]``."""
    device = next(net.parameters()).device
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=not progress,
                  dynamic_ncols=True, mininterval=1.0):
        x = images[i : i + batch].permute(0, 3, 1, 2).to(device, torch.float32).div_(255.0)
        out.append(net(x).double().cpu())
    return torch.cat(out).numpy()


def describe(net: FeatureNet) -> dict[str, Any]:
    """Metadata for reports: the file's dataset, test accuracy, feature dimension and epochs."""
    meta = getattr(net, "meta", {})
    return {k: meta.get(k) for k in ("dataset", "test_accuracy", "feature_dim", "epochs", "seed")}


# ---- CLI --------------------------------------------------------------------------------------------
