"""Image grids and PNG writing shared by eager sampling and the serving client (torch-free: the client installs
without torch). Images travel as uint8 arrays ``[N, H, W, C]`` (C = 1 or 3), exactly what the served graph
returns; the decoder mean becomes those pixels in :func:`training.model.kaem.to_uint8_nhwc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from training.io import atomic_write


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 ``[N, H, W, C]`` images into one ``[rows·(H+pad)+pad, cols·(W+pad)+pad, C]`` array."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a truncated PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save uint8 ``[N, H, W, C]`` images as one PNG grid; ``upscale`` repeats pixels for small images."""
    grid = make_grid(images, nrow=nrow)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    path = Path(path)
    _save_png(grid, path)
    return path


def save_each(images: np.ndarray, out_dir: str | Path, seeds: Sequence[int]) -> list[Path]:
    """Save one PNG per image as ``<out_dir>/seed<seed:06d>.png``."""
    if len(seeds) != len(images):
        raise ValueError("need one seed per image")
    out = []
    for seed, img in zip(seeds, images, strict=True):
        p = Path(out_dir) / f"seed{seed:06d}.png"
        _save_png(img, p)
        out.append(p)
    return out
