"""What a finished training run leaves: the DVC outputs (weights, metrics, per-epoch plots) and the MLflow run's
artifacts and registered model."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import yaml

from latentzoo.atomic import atomic_dir, atomic_write_json, atomic_write_text, json_text
from latentzoo.checkpoint import WEIGHTS_FILE, save_state, weights_record
from latentzoo.config import Params
from latentzoo.evaluation.grids import write_grids
from latentzoo.models import build_model
from latentzoo.tracking.models import log_trained_model, registered_name
from latentzoo.tracking.runs import RUN_FILE, TrackedRun, logging_failed, record_of
from latentzoo.training.loop import say


@dataclass
class TrainOutputs:
    """Where the train stage writes (all DVC outputs)."""

    model_dir: Path  # model.pt (final weights) + mlflow_run.json
    metrics_file: Path  # final-epoch metrics (DVC metrics)
    plots_file: Path  # per-epoch metrics, one row per epoch (DVC plots)


def finish_mlflow_run(
    params: Params, run: TrackedRun, model_name: str, outputs: TrainOutputs, history: list[dict], register: bool
) -> None:
    """Epochs the run lacks (logged while the server was down), images, weights, config and curves to the run, the
    model registered, the run FINISHED. A server lost at this point is a clear error: the checkpoints stay, and the
    next attempt only does this part."""
    try:
        missing = run.log_missing_epochs(history)
        if missing:
            say(f"[{model_name}] logged {missing} epoch(s) MLflow had missed")
        log_run_artifacts(run, outputs)
        if params.tracking.log_models and register:
            register_model(params, run, model_name, outputs.model_dir)
        run.finish()
    except Exception as err:
        kept = "every epoch is checkpointed"
        raise logging_failed(f"training {model_name}", run.uri, err, kept, "it only logs") from None


def write_outputs(
    params: Params,
    model_name,
    image_shape: tuple[int, int, int],
    val_urls: list[str],
    state: dict,
    outputs: TrainOutputs,
    fit_seconds: float,
    run: TrackedRun | None,
    model_args: dict | None = None,
) -> dict:
    """Final weights + run pointer (atomically, as one directory), DVC metrics and per-epoch plots."""
    model = build_model(model_name, params.model_config_for(model_name), image_shape)
    model.load_state_dict(state["model"])
    if model_args is not None:
        model.set_phase(**model_args)  # the grids show what this phase trained
    model.eval()
    history = state["history"]
    with atomic_dir(outputs.model_dir) as tmp:
        record = weights_record(
            model, model_name, params.model_config_for(model_name).model_dump(), image_shape, len(history)
        )
        save_state(tmp / WEIGHTS_FILE, record)
        (tmp / RUN_FILE).write_text(json_text(record_of(run), sort_keys=False))
        (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        write_grids(model, val_urls, tmp, params.evaluate.grid_size, params.seed)  # previews for MLflow
    final = dict(history[-1])
    final["fit_time_s"] = fit_seconds
    final["epochs"] = len(history)
    outputs.metrics_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(outputs.metrics_file, final)
    outputs.plots_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outputs.plots_file, history_csv(history))
    return final


def register_model(params: Params, run: TrackedRun, model_name: str, model_dir: Path) -> None:
    """Log the final weights to the run as an MLflow model, register it, and note the version beside the weights."""
    version = log_trained_model(run, model_dir / WEIGHTS_FILE, model_name)
    champion_metric = "test_" + params.model_config_for(model_name).tune_metric.removeprefix("val_")  # minimised
    record = run.record(
        registered_model=registered_name(model_name), model_version=version, champion_metric=champion_metric
    )
    atomic_write_json(model_dir / RUN_FILE, record, sort_keys=False)


def history_csv(history: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def log_run_artifacts(run: TrackedRun, outputs: TrainOutputs) -> None:
    for name in ("reconstructions.png", "samples.png"):
        if (outputs.model_dir / name).exists():
            run.log_artifact(outputs.model_dir / name, "images")
    run.log_artifact(outputs.model_dir / WEIGHTS_FILE, "checkpoint")
    run.log_artifact(outputs.model_dir / "params.yaml", "config")
    run.log_artifact(outputs.plots_file, "metrics")
