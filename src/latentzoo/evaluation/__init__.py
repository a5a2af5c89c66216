"""Held-out evaluation helpers: per-image metrics and image grids (no training, no tracking)."""

from latentzoo.evaluation.grids import image_grid, save_grid
from latentzoo.evaluation.metrics import active_units, mse, perplexity, psnr, ssim

__all__ = ["active_units", "image_grid", "mse", "perplexity", "psnr", "save_grid", "ssim"]
