"""Evaluation metrics (PSNR, SSIM, active units, perplexity) and image grids."""

from __future__ import annotations

import numpy as np
import pytest
import reference_metrics as hand_written
import torch
from PIL import Image

from latentzoo.evaluation import active_units, mse, perplexity, psnr, ssim
from latentzoo.evaluation.grids import image_grid, save_grid


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_mse_and_psnr_known_values():
    x = torch.full((2, 1, 8, 8), 0.5)
    torch.testing.assert_close(mse(x, x + 0.1), torch.full((2,), 0.01))
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2,), 20.0))
    torch.testing.assert_close(psnr(x * 255, x * 255 + 25.5, data_range=255.0), torch.full((2,), 20.0))


def test_psnr_identical_is_finite_and_large():
    x = rand(3, 3, 32, 32)
    p = psnr(x, x)
    assert p.shape == (3,) and torch.isfinite(p).all() and (p >= 99).all()


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 28, 28), (2, 3, 32, 32)])
def test_ssim_identical_is_one_noise_less(shape):
    x = rand(*shape)
    torch.testing.assert_close(ssim(x, x), torch.ones(shape[0]))
    noisy = (x + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = ssim(x, noisy)
    assert s.shape == (shape[0],) and (s < 0.9).all() and (s >= -1).all()
    s = ssim(x, rand(*shape, seed=7))
    assert (s >= -1).all() and (s <= 1).all() and (s < 0.5).all()
    assert (ssim(x, 1 - x) < 0).all()  # anti-correlated structure


def test_ssim_matches_a_direct_computation_on_one_window():
    """An 11x11 image with an 11x11 window has one position: SSIM from Gaussian-weighted moments by hand."""
    x, y = rand(1, 1, 11, 11), rand(1, 1, 11, 11, seed=3)
    c = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(c**2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    x, y = x[0, 0].double(), y[0, 0].double()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim(x[None, None].float(), y[None, None].float()).double()
    torch.testing.assert_close(got, expected[None], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(4, 1, 11, 11), (4, 1, 28, 28), (3, 3, 32, 32), (2, 3, 64, 48)])
def test_torchmetrics_psnr_and_ssim_equal_the_hand_written_ones(shape):
    """The swap to torchmetrics is a library change, not a metric change: the figures of the former hand-written
    code (tests/reference_metrics.py) within 1e-4, on clean, noisy, unrelated and out-of-range images. (Below
    11x11 the former code shrank the window to 7x7; torchmetrics keeps 11x11 and pads: see metrics.ssim.)"""
    x = rand(*shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for y in (x, (x + 0.1 * noise).clamp(0, 1), rand(*shape, seed=5), x + 0.3 * noise, 1 - x):
        torch.testing.assert_close(psnr(y, x), hand_written.psnr(y, x), atol=1e-4, rtol=0)
        torch.testing.assert_close(ssim(y, x), hand_written.ssim(y, x), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(x * 255, x * 255 + 3, 255.0), hand_written.psnr(x * 255, x * 255 + 3, 255.0))


def test_active_units_counts_dims_with_variance():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1000, 6, generator=g) * torch.tensor([1.0, 0.5, 0.2, 0.01, 0.0, 0.05])
    mu = mu + 3.0  # a constant offset is not activity
    assert active_units(mu) == 3  # variances 1, 0.25, 0.04 > 0.01; 1e-4, 0, 0.0025 are not
    assert active_units(mu, threshold=0.001) == 4
    assert active_units(torch.zeros(10, 4)) == 0


def test_perplexity():
    assert perplexity(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([9, 0, 0])) == pytest.approx(1.0)
    assert 1.0 < perplexity(torch.tensor([8, 1, 1])) < 3.0


@pytest.mark.parametrize(
    ("n", "nrow", "rows", "cols"), [(16, None, 4, 4), (10, None, 3, 4), (10, 5, 2, 5), (1, None, 1, 1)]
)
def test_image_grid_size(n, nrow, rows, cols):
    grid = image_grid(rand(n, 1, 8, 8), nrow=nrow, padding=2)
    assert grid.mode == "L"
    assert grid.size == (cols * 10 + 2, rows * 10 + 2)  # (width, height)


def test_image_grid_rgb_scale_and_uint8_input():
    grid = image_grid(rand(6, 3, 32, 32), nrow=3, padding=1, scale=2)
    assert grid.mode == "RGB" and grid.size == (2 * (3 * 33 + 1), 2 * (2 * 33 + 1))
    arr = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    arr[0] = 255
    grid = image_grid(arr, padding=0, scale=4)
    assert grid.mode == "L" and grid.size == (64, 64)
    pixels = np.asarray(grid)
    assert (pixels[:32, :32] == 255).all() and (pixels[32:, :] == 0).all()


def test_image_grid_places_images_in_order():
    x = torch.arange(4).float().div(3).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    pixels = np.asarray(image_grid(x, nrow=2, padding=0))
    assert pixels[0, 0] == 0 and pixels[0, 2] == 85 and pixels[2, 0] == 170 and pixels[2, 2] == 255


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        image_grid(torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError):
        image_grid(np.zeros((2, 8, 8, 2), dtype=np.uint8))


def test_save_grid_writes_a_readable_png(tmp_path):
    x = rand(9, 3, 8, 8)
    path = save_grid(x, tmp_path / "plots" / "samples.png", scale=4)
    assert path == tmp_path / "plots" / "samples.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (4 * 28, 4 * 28)
        top_left = np.asarray(im)[4:8, 4:8]  # the first image's first pixel, scaled 4x
    expected = (x[0, :, 0, 0] * 255).round().to(torch.uint8).numpy()
    assert (top_left == expected).all()
    assert [p.name for p in path.parent.iterdir()] == ["samples.png"]  # no temp file left behind
