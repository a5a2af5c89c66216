"""MNIST from the IDX files beside the repo, as float tensors in memory, for the benchmarks' plain PyTorch loops."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from latentzoo.data.sources import read_idx  # noqa: E402


def load_mnist(folder: Path, split: str, limit: int | None = None) -> Tensor:
    """The `split` ("train": 60,000, "test": 10,000) images as (N, 1, 28, 28) floats in [0, 1], the first `limit`."""
    stem = "train" if split == "train" else "t10k"
    images = read_idx(Path(folder) / f"{stem}-images-idx3-ubyte.gz", 0x00000803)[:limit]
    return torch.from_numpy(images.copy()).float().div(255).unsqueeze(1)
