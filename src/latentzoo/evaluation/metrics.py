"""Reconstruction and latent-usage metrics: pure functions on tensors, no I/O.

Images are float tensors (B, C, H, W) with values in [0, data_range]; per-image metrics return shape (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image, (B,): mean_i (x_i - y_i)^2."""
    return (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, (B,): 10 log10(L^2 / MSE).

    MSE is clamped at 1e-10, so identical images give a finite 100 dB at L = 1 instead of inf.
    """
    return 10.0 * torch.log10(data_range**2 / mse(x, y).clamp_min(1e-10))


def gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    """Normalised 2-D Gaussian kernel (size, size), the outer product of a 1-D one."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image, (B,), Wang et al. 2004 (IEEE TIP 13(4)), in [-1, 1]:

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2,

    local statistics under a Gaussian window (sigma 1.5), each channel separately, 'valid' positions only,
    averaged over channels and positions. The window is min(window_size, H, W) rounded down to odd, so 11x11 for
    MNIST/CIFAR sizes and 7x7 for 8x8 digits.
    """
    size = min(window_size, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd, so the window has a centre
    channels = x.shape[1]
    window = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Number of latent dims d with Var_x(E_q[z_d | x]) > threshold (Burda et al., arXiv 1509.00519, Sec. 5.2).

    mu: (N, D) posterior means over N held-out images. Population variance over the N images.
    """
    return int((mu.double().var(dim=0, correction=0) > threshold).sum())


def perplexity(counts: Tensor) -> float:
    """Codebook perplexity exp(H(p)), p = counts / sum(counts): K if all K codes are used equally, 1 if one is."""
    p = counts.double().flatten()
    p = p / p.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return float(torch.exp(entropy))


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(x: Tensor) -> Tensor:
    """Sharpness per image, (B,): the variance of the 3x3 Laplacian ∇²x over valid positions and channels
    (Pech-Pacheco et al., ICPR 2000). Blur lowers it; compare a model's images with real ones by the ratio."""
    channels = x.shape[1]
    kernel = LAPLACIAN.to(x.device, x.dtype).expand(channels, 1, 3, 3)
    return F.conv2d(x, kernel, groups=channels).flatten(1).var(dim=1, correction=0)
