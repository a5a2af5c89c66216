"""Held-out evaluation: per-image metrics (`metrics`), image grids (`grids`), the importance-sampled NLL
(`likelihood`), the feature classifier and its distances (`feature_classifier`, `quality`), the evaluate stage's
driver (`evaluate`) and the cross-model report (`report`). Only the metrics, which import nothing of the project,
are re-exported here: a benchmark that scores a model imports no more than it uses.
"""

from latentzoo.evaluation.metrics import active_units, mse, perplexity, psnr, ssim

__all__ = ["active_units", "mse", "perplexity", "psnr", "ssim"]
