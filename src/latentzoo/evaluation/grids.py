"""Tile a batch of images into one PIL image (reconstruction and sample grids), and save it atomically."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from latentzoo.data.loader import eval_batches
from latentzoo.models import Generative


def to_uint8_nhwc(images: Tensor | np.ndarray) -> np.ndarray:
    """Float tensor (N, C, H, W) in [0, 1], uint8 tensor NCHW, or uint8 array NHWC / NHW → uint8 (N, H, W, C)."""
    if isinstance(images, Tensor):
        images = images.detach().cpu()
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = images.permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W) grey
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"expected images as a float tensor (N, C, H, W) or a uint8 array (N, H, W, C) with C in (1, 3), "
            f"got {type(images).__name__} of shape {images.shape} and dtype {images.dtype}"
        )
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image, got 0")
    return images


def image_grid(
    images: Tensor | np.ndarray,
    nrow: int | None = None,
    padding: int = 1,
    scale: int = 1,
    pad_value: int = 0,
) -> Image.Image:
    """Images in rows of `nrow` (default ceil(sqrt(N))), `padding` pixels apart; grey → "L", RGB → "RGB".

    `scale` enlarges the whole grid by an integer factor with NEAREST, so 8x8 digits stay crisp.
    """
    arr = to_uint8_nhwc(images)
    n, h, w, c = arr.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)  # 2-D uint8 → "L", (H, W, 3) uint8 → "RGB"
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def save_grid(images: Tensor | np.ndarray, path: str | Path, **kw) -> Path:
    """Write image_grid(images, **kw) as a PNG at `path`, atomically (temp file in the same folder, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image_grid(images, **kw)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@torch.no_grad()
def write_grids(model, urls: list[str], out_dir: Path, n: int, seed: int) -> None:
    """Reconstructions of the first images of `urls` (originals above, reconstructions below) and prior samples."""
    x, _ = next(iter(eval_batches(urls, batch_size=min(n, 32))))
    generator = torch.Generator().manual_seed(seed)
    scale = max(1, 256 // (x.shape[-1] * 8))  # 8x8 digits become a readable ~256 px grid
    recon = model(x, generator=generator).recon
    save_grid(torch.cat([x, recon]), out_dir / "reconstructions.png", nrow=8, scale=scale)
    if isinstance(model, Generative):
        save_grid(model.sample(n, generator=generator), out_dir / "samples.png", scale=scale)
