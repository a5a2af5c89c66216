"""The classifier stage: the feature network of FID, KID and precision/recall, trained on the training split."""

from __future__ import annotations

from pathlib import Path

from latentzoo.atomic import atomic_dir, atomic_write_json
from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.data.shards import checked_shards
from latentzoo.evaluation.feature_classifier import save_classifier, train_classifier


def classifier_stage(params: Params, shard_dir: Path, out_dir: Path, metrics_file: Path) -> dict:
    """Train the feature network of the sample-quality metrics on the training split; its test accuracy is a DVC
    metric."""
    shard_dir = Path(shard_dir)
    manifest, urls = checked_shards(shard_dir, ("train", "test"))
    model, result = train_classifier(params.classifier, urls["train"], urls["test"], params.seed)
    with atomic_dir(Path(out_dir)) as tmp:
        save_classifier(model, params.classifier, manifest["image_shape"], tmp / WEIGHTS_FILE)
    atomic_write_json(Path(metrics_file), result)
    print(
        f"classifier: test accuracy {result['test_accuracy']:.4f} ({result['train_images']} training images, "
        f"{result['train_time_s']:.1f}s); quality-metric features in {Path(out_dir) / WEIGHTS_FILE}"
    )
    return result
