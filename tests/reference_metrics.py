"""The hand-written PSNR, SSIM and Fréchet distance latentzoo used before it took torchmetrics': kept only as the
oracle of the tests that show the swap changed no figure (test_metrics, test_quality)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    size = min(window_size, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    channels = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x.pow(2), blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, mu_g = real.mean(0), fake.mean(0)
    cov_r, cov_g = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    values, vectors = np.linalg.eigh(cov_r)
    root_r = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    eigenvalues = np.linalg.eigvalsh(root_r @ cov_g @ root_r).clip(min=0)
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(cov_r) + np.trace(cov_g) - 2 * np.sqrt(eigenvalues).sum())
