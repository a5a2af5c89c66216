"""The evaluate@<model> stage: test metrics of a trained model, added to its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from latentzoo.atomic import atomic_dir, atomic_write_json
from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.evaluation.evaluate import evaluate_model
from latentzoo.tracking.models import CHAMPION, promote_champion, tag_version
from latentzoo.tracking.runs import RUN_FILE, RUN_LINK, TrackedRun, log_shards


def evaluate_stage(
    params: Params,
    model_dir: Path,
    shard_dir: Path,
    metrics_file: Path,
    plots_dir: Path,
    classifier: Path | None = None,
) -> dict:
    """Test metrics of one trained model; with the classifier stage's `classifier` weights, FID, KID,
    precision/recall/density/coverage and sharpness."""
    model_dir, shard_dir, plots_dir = Path(model_dir), Path(shard_dir), Path(plots_dir)
    record = json.loads((model_dir / RUN_FILE).read_text()) if (model_dir / RUN_FILE).exists() else {}
    run = TrackedRun.from_record(record) if params.tracking.enabled else None  # the store the training logged to
    with atomic_dir(plots_dir) as figures:  # interrupted: no half of the figures under plots_dir
        result = evaluate_model(
            params, model_dir / WEIGHTS_FILE, shard_dir, figures_dir=figures, classifier_path=classifier
        )
        if run:  # the report links each family to its training run
            atomic_write_json(figures / RUN_LINK, {"run_id": run.run_id, "url": run.ui_url()})
    atomic_write_json(Path(metrics_file), result)
    if run:
        log_to_training_run(run, record, result, plots_dir)
        log_shards(run, shard_dir, ("test",))
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
            "test_fid_samples",
            "test_fid_recon",
            "test_kid_samples",
        )
    }
    print(f"evaluate: {model_dir.name}: {shown}")
    return result


def log_to_training_run(run: TrackedRun, record: dict, result: dict, plots_dir: Path) -> None:
    """Test metrics and grids go to the MLflow run of the training that made the model."""
    run.log_metrics(result)
    for png in sorted(plots_dir.glob("*.png")):
        run.log_artifact(png, "evaluation")
    run.set_tags({"latentzoo.evaluated": "true"})
    if record.get("model_version"):  # the registered version carries its test metrics too
        name, version = record["registered_model"], record["model_version"]
        tag_version(run.uri, name, version, result)
        key = record.get("champion_metric")
        if key and promote_champion(run.uri, name, version, result, key):
            print(f"evaluate: {name} version {version} is the new @{CHAMPION} (lowest {key})")
