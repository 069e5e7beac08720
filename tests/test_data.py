"""Data layer: offline datasets in torchvision's formats, idx/npm conversion, and the SVHN/CIFAR-10/
CelebA readers on small synthetic files written in the real on-disk formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from training import data
from training.data import DataError, load_dataset
from training.prepare_data import mnist_arrays, write_idx, write_mnist_split


def test_digits_split_shapes_and_range() -> None:
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1500, 297)
    batch = tr.__getitems__([0, 5, 7])
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0 and float(batch.max()) > 0.5
    assert torch.equal(load_dataset("digits", split="test").images, te.images)  # seeded split


def _write_idx_root(root: Path, folder: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    for split, imgs in arrays.items():
        write_idx(raw / f"{split}-images-idx3-ubyte", imgs)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(len(imgs)) % 10)
    return arrays


@pytest.mark.parametrize(("name", "folder"), [("fmnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_round_trip_through_torchvision(tmp_path: Path, name: str, folder: str) -> None:
    arrays = _write_idx_root(tmp_path, folder, np.random.default_rng(1))
    ds = load_dataset(name, tmp_path, "train")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays["train"]))
    assert torch.allclose(ds[3][0], torch.from_numpy(arrays["train"][3]).float() / 255)
    assert len(load_dataset(name, tmp_path, "test")) == 5


def test_npm_json_conversion_is_exact_and_split_seeded(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    truth = {}
    for d in range(10):
        px = rng.integers(0, 256, (3, 784))
        truth[d] = px
        (tmp_path / f"{d}.json").write_text(json.dumps({"data": [round(v / 255, 3) for v in px.flatten()]}))
    images, labels = mnist_arrays(tmp_path)
    assert images.shape == (30, 28, 28) and np.array_equal(np.bincount(labels), [3] * 10)
    for d in range(10):
        assert np.array_equal(images[labels == d].reshape(3, 784), truth[d])  # 3 decimals restore uint8
    write_mnist_split(images, labels, tmp_path / "a" / "MNIST" / "raw", n_train=20)
    write_mnist_split(images, labels, tmp_path / "b" / "MNIST" / "raw", n_train=20)
    a, b = load_dataset("mnist", tmp_path / "a"), load_dataset("mnist", tmp_path / "b")
    assert len(a) == 20 and torch.equal(a.images, b.images)


class _NoMD5:
    """Test-only: synthetic files cannot match the official checksums, so skip the integrity check."""

    def _check_integrity(self) -> bool:
        return True


class _SVHN(_NoMD5, torchvision.datasets.SVHN):
    pass


class _CIFAR10(_NoMD5, torchvision.datasets.CIFAR10):
    def _load_meta(self) -> None:  # the stock one verifies batches.meta's MD5 too
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CelebA(_NoMD5, torchvision.datasets.CelebA):
    pass


@pytest.fixture()
def test_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.READERS, "svhn", _SVHN)
    monkeypatch.setitem(data.READERS, "cifar10", _CIFAR10)
    monkeypatch.setitem(data.READERS, "celeba", _CelebA)


def test_svhn_mat_files(tmp_path: Path, test_readers: None) -> None:
    from scipy.io import savemat

    x = np.random.default_rng(3).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[1], [2], [3], [10]], dtype=np.uint8)})
    ds = load_dataset("svhn", tmp_path, "train")
    assert len(ds) == 4
    img = ds[2]
    assert img.shape == (3, 32, 32)
    assert torch.allclose(img, torch.from_numpy(x[..., 2]).permute(2, 0, 1).float() / 255)


def test_cifar10_pickled_batches(tmp_path: Path, test_readers: None) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(4)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        with open(base / name, "wb") as fh:
            pickle.dump({"data": batches[name], "labels": [0, 1]}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    ds = load_dataset("cifar10", tmp_path, "train")
    assert len(ds) == 10
    want = torch.from_numpy(batches["data_batch_1"][1].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(ds[1], want)
    assert len(load_dataset("cifar10", tmp_path, "test")) == 2


def test_celeba_layout(tmp_path: Path, test_readers: None) -> None:
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 6)]  # 3 train, 2 test (torchvision fails on 1-image splits)
    for i, n in enumerate(names):
        Image.fromarray(np.full((218, 178, 3), 40 * i, dtype=np.uint8)).save(base / "img_align_celeba" / n)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {0 if i < 3 else 2}\n" for i, n in enumerate(names)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text(
        "5\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names))
    cols = " ".join(f"p{k}" for k in range(10))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"5\n{cols}\n" + "".join(f"{n} " + " ".join(["5"] * 10) + "\n" for n in names))
    attrs = " ".join(f"a{k}" for k in range(40))
    (base / "list_attr_celeba.txt").write_text(
        f"5\n{attrs}\n" + "".join(f"{n} " + " ".join(["1"] * 40) + "\n" for n in names))
    ds = load_dataset("celeba", tmp_path, "train")
    assert len(ds) == 3
    img = ds[2]
    assert img.shape == (3, 64, 64) and abs(float(img.mean()) - 80 / 255) < 0.01
    assert len(load_dataset("celeba", tmp_path, "test")) == 2


@pytest.mark.parametrize("name", ["fmnist", "mnist", "svhn", "cifar10", "celeba"])
def test_missing_root_names_expected_files(tmp_path: Path, name: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path / "empty")
    key = {"fmnist": "FashionMNIST/raw", "mnist": "MNIST/raw", "svhn": "train_32x32.mat",
           "cifar10": "cifar-10-batches-py", "celeba": "img_align_celeba"}[name]
    assert key in str(err.value)


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(DataError, match="choose one of: fmnist, mnist, digits, svhn, cifar10, celeba"):
        load_dataset("imagenet")


def test_installed_offline_datasets() -> None:
    root = data.default_data_root()
    if not (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"offline data not installed under {root} (make setup installs it)")
    assert (len(load_dataset("fmnist")), len(load_dataset("fmnist", split="test"))) == (60000, 10000)
    assert len(load_dataset("mnist")) + len(load_dataset("mnist", split="test")) == 10000
    x = load_dataset("fmnist").__getitems__(list(range(256)))
    assert 0.2 < float(x.mean()) < 0.4  # Fashion-MNIST's mean pixel is about 0.29
