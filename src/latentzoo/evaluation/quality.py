"""Sample and reconstruction quality against real test images, in the classifier stage's feature space and by
sharpness. The feature network is ours (no Inception: nothing is downloaded, and digits are not ImageNet); the
metrics are the libraries' (torchmetrics, prdc), given that network as their feature extractor:

fid_samples   = FID(real test images, prior samples), on the classifier features       (lower is better)
fid_recon     = FID(real, reconstructions of the same images)
                  FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})   (Heusel et al., arXiv 1706.08500)
kid_samples   = KID: the unbiased MMD² under the kernel k(a, b) = (aᵀb / d + 1)³, mean (and std, kid_samples_std)
                over random subsets (Bińkowski et al., arXiv 1801.01401)                (lower is better)
precision, recall, density, coverage of the samples: k-nearest-neighbour balls around real and generated
                features (Naeem et al., arXiv 2002.09797, the authors' `prdc`; k = NEAREST_K)  (higher is better)
sharpness_*   = mean_i Var(∇² x̂_i) / mean_i Var(∇² x_i)   (1 = as sharp as the data, < 1 blurrier)
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from prdc import compute_prdc
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from latentzoo.evaluation.feature_classifier import FeatureClassifier, features
from latentzoo.evaluation.metrics import laplacian_variance

NEAREST_K = 5  # Naeem et al.'s choice for precision / recall / density / coverage
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # or fewer, when there are fewer images
CHUNK = 1024  # images per forward pass of the feature network


class ClassifierFeatures(nn.Module):
    """The classifier's features as a torchmetrics `feature=` extractor: (B, C, H, W) in [0, 1] → (B, d)."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.head.in_features  # torchmetrics reads it instead of probing with a dummy

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


@torch.no_grad()
def quality_metrics(
    classifier: FeatureClassifier, real: Tensor, recon: Tensor, samples: Tensor | None, seed: int = 0
) -> dict:
    """`real` and `recon`: (N, C, H, W) test images and their reconstructions; `samples`: prior samples or None.
    `seed` fixes KID's random subsets."""
    extractor = ClassifierFeatures(classifier)
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    update(fid, real, real=True)
    real_sharpness = max(float(laplacian_variance(real).mean()), 1e-12)
    result = {
        "fid_recon": frechet(fid, recon),
        "sharpness_recon": float(laplacian_variance(recon).mean()) / real_sharpness,
    }
    if samples is not None:
        result["fid_samples"] = frechet(fid, samples)
        result |= kernel_distance(extractor, real, samples, seed)
        result |= fidelity_and_diversity(features(classifier, real), features(classifier, samples))
        result["sharpness_samples"] = float(laplacian_variance(samples).mean()) / real_sharpness
    return result


def update(metric, images: Tensor, **kwargs) -> None:
    for chunk in images.split(CHUNK):
        metric.update(chunk, **kwargs)


def frechet(fid, fake: Tensor) -> float:
    """FID of `fake` against the real features `fid` keeps across resets."""
    fid.reset()
    update(fid, fake, real=False)
    return float(fid.compute())


def kernel_distance(extractor: nn.Module, real: Tensor, fake: Tensor, seed: int) -> dict:
    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # it keeps every feature vector: a few MB at our sample counts
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=KID_SUBSETS, subset_size=size)
    update(kid, real, real=True)
    update(kid, fake, real=False)
    with torch.random.fork_rng():  # the subsets come from torch's global generator
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return {"kid_samples": float(mean), "kid_samples_std": float(std)}


def fidelity_and_diversity(real: np.ndarray, fake: np.ndarray) -> dict:
    """Precision and density (are samples where real images are?), recall and coverage (is every kind of real
    image generated?), from k-NN balls in feature space."""
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the two set sizes
        found = compute_prdc(real.astype(np.float32), fake.astype(np.float32), nearest_k=NEAREST_K)
    return {name: float(value) for name, value in found.items()}
