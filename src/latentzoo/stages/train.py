"""The train@<model> stage: Ray Train fits a family on the shards, with the tuned weights."""

from __future__ import annotations

from pathlib import Path

from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.training.trainer import TrainOutputs, train_model
from latentzoo.tuning.tuned import apply_tuned


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
