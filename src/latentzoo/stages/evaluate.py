"""The evaluate@<model> stage: test metrics of a trained model, added to its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from latentzoo.atomic import atomic_dir, atomic_write_json
from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.evaluation.evaluate import evaluate_model
from latentzoo.tracking.models import tag_version
from latentzoo.tracking.runs import RUN_FILE, TrackedRun


def evaluate_stage(
    params: Params,
    model_dir: Path,
    shard_dir: Path,
    metrics_file: Path,
    plots_dir: Path,
    classifier: Path | None = None,
) -> dict:
    """Test metrics of one trained model; with the classifier stage's `classifier` weights, FCD and sharpness."""
    model_dir, shard_dir, plots_dir = Path(model_dir), Path(shard_dir), Path(plots_dir)
    with atomic_dir(plots_dir) as figures:  # interrupted: no half of the figures under plots_dir
        result = evaluate_model(
            params, model_dir / WEIGHTS_FILE, shard_dir, figures_dir=figures, classifier_path=classifier
        )
    atomic_write_json(Path(metrics_file), result)
    log_to_training_run(params, model_dir, result, plots_dir)
    shown = {
        k: round(v, 4)
        for k, v in result.items()
        if k
        in (
            "test_neg_elbo",
            "test_nll",
            "test_mse",
            "test_psnr",
            "test_utilisation",
            "test_perplexity",
            "test_fcd_samples",
            "test_fcd_recon",
        )
    }
    print(f"evaluate: {model_dir.name}: {shown}")
    return result


def log_to_training_run(params: Params, model_dir: Path, result: dict, plots_dir: Path) -> None:
    """Test metrics and grids go to the MLflow run of the training that made the model."""
    record_file = model_dir / RUN_FILE
    if not params.tracking.enabled or not record_file.exists():
        return
    record = json.loads(record_file.read_text())
    run = TrackedRun.from_record(record)  # the store the training logged to
    if not run:
        return
    run.log_metrics(result)
    for png in sorted(plots_dir.glob("*.png")):
        run.log_artifact(png, "evaluation")
    run.set_tags({"latentzoo.evaluated": "true"})
    if record.get("model_version"):  # the registered version carries its test metrics too
        tag_version(run.uri, record["registered_model"], record["model_version"], result)
