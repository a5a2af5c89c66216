"""What each DVC stage does, as functions the thin scripts in pipelines/ call and tests call directly.

Paths come from the command line (dvc.yaml), knobs from the validated params; every output is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentzoo.atomic import atomic_dir, atomic_write_text
from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.data.prepare import prepare
from latentzoo.data.shards import checked_shards, write_shards
from latentzoo.evaluation.evaluate import evaluate_model, write_metrics
from latentzoo.evaluation.feature_classifier import save_classifier, train_classifier
from latentzoo.evaluation.report import build_report
from latentzoo.tracking.models import tag_version
from latentzoo.tracking.runs import RUN_FILE, TrackedRun
from latentzoo.training.layerwise import curves_csv, finetune_stack, pretrain_stack
from latentzoo.training.trainer import TrainOutputs, history_csv, train_model
from latentzoo.tuning.search import apply_tuned, tune_model

MLFLOW_UI = (
    "Browse the runs: `.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
    "then open http://127.0.0.1:5000/#/experiments (pick an experiment, then its Runs tab)."
)


def prepare_stage(params: Params, out_dir: Path) -> dict:
    info = prepare(params.data, params.seed, Path(out_dir))
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    print(
        f"prepare: {params.data.source} → {out_dir}: {counts}; image shape {info['image_shape']}; "
        f"skipped {info['skipped']['count']}"
    )
    return info


def shard_stage(params: Params, prepared_dir: Path, out_dir: Path) -> dict:
    manifest = write_shards(Path(prepared_dir), Path(out_dir), params.shard.maxcount)
    for split, entry in manifest["splits"].items():
        print(f"shard: {split}: {entry['count']} samples in {len(entry['shards'])} shard(s)")
    return manifest


def tune_stage(params: Params, model_name: str, shard_dir: Path, out_file: Path) -> dict:
    best = tune_model(params, model_name, Path(shard_dir), Path(out_file))
    if not best["searched"]:
        print(f"tune: {model_name}: no search ({best['reason']}); training uses params.yaml's weights")
    else:
        weights = ", ".join(f"{k} {v:.4g}" for k, v in best["weights"].items())
        trials = best["trials"]
        print(
            f"tune: {model_name}: best {best['metric']} {best['best_value']:.4g} with {weights} "
            f"({trials['total']} trials, {trials['stopped_early']} stopped early, {trials['errored']} errored) "
            f"→ {out_file}"
        )
    return best


def train_stage(
    params: Params,
    model_name: str,
    shard_dir: Path,
    model_dir: Path,
    metrics_file: Path,
    plots_file: Path,
    tuned: Path | None = None,
) -> dict:
    if tuned is not None:
        params = apply_tuned(params, model_name, Path(tuned))
    outputs = TrainOutputs(Path(model_dir), Path(metrics_file), Path(plots_file))
    final = train_model(params, model_name, Path(shard_dir), outputs)
    print(
        f"train: {model_name} done in {final['fit_time_s']:.1f}s: val_loss {final['val_loss']:.4g}; "
        f"weights in {Path(model_dir) / WEIGHTS_FILE}"
    )
    return final


def pretrain_stage(params: Params, shard_dir: Path, out_dir: Path, metrics_file: Path, plots_file: Path) -> dict:
    done = pretrain_stack(params, Path(shard_dir), Path(out_dir))
    write_metrics(Path(metrics_file), done["metrics"])
    Path(plots_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(plots_file), history_csv(done["rows"]))
    errors = ", ".join(f"{v:.4g}" for k, v in sorted(done["metrics"].items()) if k.startswith("test_recon_mse"))
    print(
        f"pretrain: stacked_ae {params.stacked_ae.layers}: test reconstruction error per layer {errors}; "
        f"stack in {Path(out_dir) / WEIGHTS_FILE}"
    )
    return done["metrics"]


def finetune_stage(
    params: Params, pretrained_dir: Path, shard_dir: Path, out_dir: Path, metrics_file: Path, plots_file: Path
) -> dict:
    done = finetune_stack(params, Path(pretrained_dir), Path(shard_dir), Path(out_dir))
    write_metrics(Path(metrics_file), done["metrics"])
    Path(plots_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(plots_file), curves_csv(done["curves"]))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in done["metrics"].items() if k.startswith("test_accuracy"))
    print(
        f"finetune: stacked_ae with {params.finetune.label_fraction:.0%} of the labels "
        f"({done['metrics']['labelled_images']} images): {shown}"
    )
    return done["metrics"]


def classifier_stage(params: Params, shard_dir: Path, out_dir: Path, metrics_file: Path) -> dict:
    """Train the feature classifier of the FCD on the training split; its test accuracy is a DVC metric."""
    shard_dir = Path(shard_dir)
    manifest, urls = checked_shards(shard_dir, ("train", "test"))
    model, result = train_classifier(params.classifier, urls["train"], urls["test"], params.seed)
    with atomic_dir(Path(out_dir)) as tmp:
        save_classifier(model, params.classifier, manifest["image_shape"], tmp / WEIGHTS_FILE)
    write_metrics(Path(metrics_file), result)
    print(
        f"classifier: test accuracy {result['test_accuracy']:.4f} ({result['train_images']} training images, "
        f"{result['train_time_s']:.1f}s); FCD features in {Path(out_dir) / WEIGHTS_FILE}"
    )
    return result


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
    write_metrics(Path(metrics_file), result)
    log_to_training_run(params, model_dir, result, plots_dir)
    shown = {
        k: round(v, 4)
        for k, v in result.items()
        if k
        in (
            "test_neg_elbo",
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


def read_stacked(pretrain_metrics: Path | None, finetune_metrics: Path | None) -> dict:
    """The stacked autoencoder's pretrain and finetune metrics, where those stages ran."""
    found = {}
    for key, path in (("pretrain", pretrain_metrics), ("finetune", finetune_metrics)):
        if path is not None and Path(path).exists():
            found[key] = json.loads(Path(path).read_text())
    return found


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


def report_stage(
    params: Params,
    eval_dir: Path,
    train_dir: Path,
    plots_dir: Path,
    out_dir: Path,
    pretrain_metrics: Path | None = None,
    finetune_metrics: Path | None = None,
    curves_dir: Path | None = None,
) -> Path:
    report = build_report(
        list(params.models),
        Path(eval_dir),
        Path(train_dir),
        Path(plots_dir),
        Path(out_dir),
        mlflow_hint=MLFLOW_UI,
        stacked=read_stacked(pretrain_metrics, finetune_metrics),
        curves_dir=curves_dir,
    )
    if params.tracking.enabled:
        experiment = f"{params.tracking.experiment_prefix}-report"
        run = TrackedRun.start(None, experiment, "report", {"latentzoo.stage": "report"})
        for name in ("report.md", "report.html", "metrics.json", "images"):
            if (Path(out_dir) / name).exists():
                run.log_artifact(Path(out_dir) / name)
        run.finish()
    print(f"report: {report}")
    return report
