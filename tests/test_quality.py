"""Sample quality: the feature classifier (classifier stage), Fréchet classifier distance, sharpness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference_metrics as hand_written
import torch

from latentzoo.checkpoint import save_state, weights_record
from latentzoo.evaluation.evaluate import evaluate_model
from latentzoo.evaluation.feature_classifier import load_classifier
from latentzoo.evaluation.metrics import laplacian_variance
from latentzoo.evaluation.quality import fidelity_and_diversity, frechet, kernel_distance
from latentzoo.models import build_model
from latentzoo.stages.classifier import classifier_stage


class Features(torch.nn.Module):
    """Feature vectors as their own features: the metrics then see exactly the vectors a test gives."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def torchmetrics_fid(real: np.ndarray, fake: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Features(real.shape[1]), reset_real_features=False)
    fid.update(torch.from_numpy(real), real=True)
    return frechet(fid, torch.from_numpy(fake))


def test_fid_of_gaussians_matches_closed_form_and_the_hand_written_distance():
    """N(0, I) against N(1, 4I) in d dims: ‖μ‖² = d and Tr(I + 4I − 2·2I) = d, so FD = 2d; and torchmetrics' FID
    equals the former hand-written Fréchet distance (tests/reference_metrics.py) within 1e-3 relative."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + 1
    assert torchmetrics_fid(a, a) == pytest.approx(0, abs=1e-4)
    assert torchmetrics_fid(a, b) == pytest.approx(6.0, rel=0.05)
    correlated = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16)), rng.normal(size=(2000, 16)) * 0.5 + 0.2
    for real, fake in ((a, b), (b, a), correlated):
        assert torchmetrics_fid(real, fake) == pytest.approx(hand_written.frechet_distance(real, fake), rel=1e-3)


def test_kid_and_prdc_tell_a_match_from_a_shifted_set():
    rng = np.random.default_rng(1)
    real, same, shifted = (rng.normal(size=(400, 8)).astype(np.float32) for _ in range(3))
    shifted += 3
    near = kernel_distance(Features(8), torch.from_numpy(real), torch.from_numpy(same), seed=0)
    far = kernel_distance(Features(8), torch.from_numpy(real), torch.from_numpy(shifted), seed=0)
    assert abs(near["kid_samples"]) < 0.05 < far["kid_samples"]
    assert near == kernel_distance(Features(8), torch.from_numpy(real), torch.from_numpy(same), seed=0)  # seeded
    good, bad = fidelity_and_diversity(real, same), fidelity_and_diversity(real, shifted)
    assert set(good) == {"precision", "recall", "density", "coverage"}
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and good["coverage"] > 0.8
    assert bad["precision"] < 0.1 and bad["coverage"] < 0.1


def test_laplacian_variance_falls_with_blur():
    x = (torch.rand(4, 1, 16, 16) > 0.5).float()
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert (laplacian_variance(blurred) < laplacian_variance(x)).all()
    assert laplacian_variance(torch.full((1, 3, 8, 8), 0.5)).item() == 0


@pytest.fixture(scope="module")
def classifier(digits_shards, tmp_path_factory):
    from conftest import make_params

    params = make_params(
        **{"classifier.epochs": 5, "classifier.batch_size": 32, "classifier.width": 8, "classifier.feature_dim": 16}
    )
    out = tmp_path_factory.mktemp("classifier")
    result = classifier_stage(params, digits_shards, out / "model", out / "metrics.json")
    return out / "model" / "model.pt", result, json.loads((out / "metrics.json").read_text())


def test_classifier_stage_learns_digits(classifier):
    path, result, written = classifier
    assert written == result
    assert result["test_accuracy"] > 0.8 and result["num_classes"] == 10
    assert load_classifier(path).features(torch.rand(2, 1, 8, 8)).shape == (2, 16)


def test_evaluate_adds_sample_quality_and_sharpness(classifier, digits_shards, tiny_params, tmp_path):
    params = tiny_params(**{"classifier.num_samples": 200})
    torch.manual_seed(0)
    model = build_model("vae", params.vae, (1, 8, 8))
    path = tmp_path / "model.pt"
    save_state(path, weights_record(model, "vae", params.vae.model_dump(), (1, 8, 8), epoch=0))
    result = evaluate_model(params, path, digits_shards, progress=False, classifier_path=classifier[0])
    assert result["test_fid_samples"] > 0 and result["test_fid_recon"] > 0 and result["test_kid_samples_std"] >= 0
    assert all(0 <= result[f"test_{k}"] <= 1 for k in ("precision", "recall", "coverage"))
    assert result["test_density"] >= 0
    assert 0 <= result["test_sharpness_recon"] and 0 <= result["test_sharpness_samples"]
    again = evaluate_model(params, path, digits_shards, progress=False, classifier_path=classifier[0])
    assert again == result  # seeded samples


def test_a_foreign_file_is_not_a_classifier(tmp_path):
    from latentzoo.errors import LatentzooError

    path = tmp_path / "x.pt"
    save_state(path, {"format": 1})
    with pytest.raises(LatentzooError, match="not a latentzoo feature classifier"):
        load_classifier(path)
