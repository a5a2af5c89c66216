"""Sample and reconstruction quality against real test images, in the feature classifier's space and by sharpness:

fcd_samples    = FCD(features of real test images, features of prior samples)   (lower is better)
fcd_recon      = FCD(real, reconstructions of the same images)
sharpness_*    = mean_i Var(∇² x̂_i) / mean_i Var(∇² x_i)   (1 = as sharp as the data, < 1 blurrier)
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentzoo.evaluation.feature_classifier import FeatureClassifier, features, frechet_distance
from latentzoo.evaluation.metrics import laplacian_variance


@torch.no_grad()
def quality_metrics(classifier: FeatureClassifier, real: Tensor, recon: Tensor, samples: Tensor | None) -> dict:
    """`real` and `recon`: (N, C, H, W) test images and their reconstructions; `samples`: prior samples or None."""
    real_features = features(classifier, real)
    real_sharpness = max(float(laplacian_variance(real).mean()), 1e-12)
    result = {
        "fcd_recon": frechet_distance(real_features, features(classifier, recon)),
        "sharpness_recon": float(laplacian_variance(recon).mean()) / real_sharpness,
    }
    if samples is not None:
        result["fcd_samples"] = frechet_distance(real_features, features(classifier, samples))
        result["sharpness_samples"] = float(laplacian_variance(samples).mean()) / real_sharpness
    return result
