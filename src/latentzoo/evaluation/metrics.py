"""Reconstruction and latent-usage metrics: pure functions on tensors, no I/O. PSNR and SSIM are torchmetrics';
what no library has (active units, codebook perplexity, Laplacian sharpness) is written here.

Images are float tensors (B, C, H, W) with values in [0, data_range]; per-image metrics return shape (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image, (B,): mean_i (x_i - y_i)^2."""
    return (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, (B,): 10 log10(L^2 / MSE) (torchmetrics).

    Capped at 10 log10(L^2 / 1e-10) (100 dB at L = 1), so identical images give a finite figure instead of inf.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio  # here: torchmetrics takes 2 s to import

    value = peak_signal_noise_ratio(x.float(), y.float(), data_range=data_range, reduction="none", dim=(1, 2, 3))
    return value.clamp(max=10.0 * math.log10(data_range**2 / 1e-10))


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image, (B,), Wang et al. 2004 (IEEE TIP 13(4)), in [-1, 1] (torchmetrics):

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2,

    local statistics under a Gaussian window (sigma 1.5: 11x11), each channel separately, in float64, averaged
    over channels and the 'valid' positions of Wang et al.'s reference code: torchmetrics' SSIM map without the
    reflect-padded border torchmetrics adds. An image no larger than the window (the 8x8 digits) has no valid
    position and keeps torchmetrics' padded map.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure  # here: 2 s to import

    _, full = structural_similarity_index_measure(
        x.double(), y.double(), sigma=sigma, data_range=data_range, reduction="none", return_full_image=True
    )
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' window is 2 pad + 1 wide
    if min(x.shape[-2], x.shape[-1]) > 2 * pad:
        full = full[..., pad:-pad, pad:-pad]
    return full.flatten(1).mean(dim=1).float()


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
