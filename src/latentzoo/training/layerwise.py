"""Greedy layer-wise pretraining of the stacked autoencoder, then supervised fine-tuning (pretrain, finetune stages).

pretrain: for k = 1..L, one Ray Train run trains layer k as a (denoising) autoencoder on the frozen outputs of
layers 1..k-1, starting from the weights the run of layer k-1 ended with. The pretrained stack is the last run's
weights. finetune: from those weights, one run fine-tunes encoders and classifier head with labels; beside it, the
same network from random initialisation and a linear probe of the frozen features, with the same epochs and labels.

Every phase is a `Phase` of `train_model`: its own Ray run (DDP, a checkpoint per epoch, resume), and its own
MLflow run nested under the stage's parent run. A stage interrupted at layer k resumes there: the finished
phases before it are read back from their last checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from latentzoo.atomic import atomic_dir
from latentzoo.checkpoint import WEIGHTS_FILE, load_model
from latentzoo.data.loader import count_labelled
from latentzoo.data.shards import load_manifest, sha256_file
from latentzoo.errors import ConfigError
from latentzoo.evaluation.classify import accuracy, layer_errors, test_urls
from latentzoo.storage import RunFolder, storage_location
from latentzoo.tracking import mlflow_runs
from latentzoo.training.trainer import RUN_FILE, RUN_RECORD, Phase, TrainOutputs, history_csv, run_name, train_model

MODEL = "stacked_ae"


def with_train(params, **update):
    """Params whose train section has `update` (a phase's own epochs and learning rate)."""
    return params.model_copy(update={"train": params.train.model_copy(update=update)})


def check_classes(params, shard_dir: Path) -> None:
    """The classifier head must have one output per class of the data."""
    found = load_manifest(shard_dir).get("num_classes")
    if found is not None and found != params.stacked_ae.num_classes:
        raise ConfigError(
            f"stacked_ae.num_classes is {params.stacked_ae.num_classes} but "
            f"{Path(shard_dir) / 'manifest.json'} has {found} classes; set it to {found}"
        )


def phase_outputs(tmp: Path, name: str) -> TrainOutputs:
    return TrainOutputs(tmp / name, tmp / f"{name}.json", tmp / f"{name}.csv")


def pretrain_stack(params, shard_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Pretrain the L layers greedily; write the stack (`out_dir/model.pt`) and each layer's run under
    `out_dir/layer-<k>/`. Returns {"layers": [final row of each layer], "test": per-layer test errors, ...}."""
    cfg, shard_dir = params.stacked_ae, Path(shard_dir)
    check_classes(params, shard_dir)
    phase_params = with_train(params, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, lr_schedule="constant")
    uri, parent = parent_run(phase_params, "pretrain", shard_dir, root)
    finals, rows = [], []
    with atomic_dir(out_dir) as tmp:
        init = None
        for k in range(1, len(cfg.layers) + 1):
            phase = Phase(f"layer-{k}", {"mode": "pretrain", "layer": k}, init_weights=init, parent_run_id=parent)
            out = phase_outputs(tmp, phase.name)
            finals.append(train_model(phase_params, MODEL, shard_dir, out, root, phase))
            rows += [{"layer": k, **row} for row in read_rows(out.plots_file)]
            init = out.model_dir / WEIGHTS_FILE
        shutil.copyfile(init, tmp / WEIGHTS_FILE)
        model, _ = load_model(tmp / WEIGHTS_FILE)
        errors = layer_errors(model, test_urls(shard_dir), params.evaluate.batch_size)
        test = {f"test_{k}": v for k, v in errors.items()}
    result = {
        **test,
        **{f"val_recon_mse_layer{k}": f["val_recon_mse"] for k, f in enumerate(finals, 1)},
        "fit_time_s": sum(f["fit_time_s"] for f in finals),
        "epochs_per_layer": cfg.pretrain_epochs,
        "layers": list(cfg.layers),
    }
    close_parent(uri, parent, result)
    return {"metrics": result, "rows": rows}


def finetune_stack(params, pretrained_dir: Path, shard_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Fine-tune the pretrained stack with labels, beside the random-init baseline and the linear probe (each as
    set in the finetune section); write each under `out_dir/<variant>/`; return test accuracies and curves."""
    ft, shard_dir = params.finetune, Path(shard_dir)
    check_classes(params, shard_dir)
    pretrained = Path(pretrained_dir) / WEIGHTS_FILE
    variants = [("pretrained", "finetune", pretrained)]
    variants += [("random", "finetune", None)] if ft.baseline else []
    variants += [("probe", "probe", pretrained)] if ft.probe else []
    phase_params = with_train(params, epochs=ft.epochs, lr=ft.lr, lr_schedule=ft.lr_schedule)
    uri, parent = parent_run(phase_params, "finetune", shard_dir, root, pretrained)
    urls = test_urls(shard_dir)
    result, curves, fit = {"label_fraction": ft.label_fraction, "epochs": ft.epochs}, {}, 0.0
    with atomic_dir(out_dir) as tmp:
        for name, mode, init in variants:
            args = {"mode": mode, "dropout": ft.dropout if mode == "finetune" else 0.0}
            phase = Phase(f"finetune-{name}", args, init, ft.label_fraction, parent)
            out = phase_outputs(tmp, name)
            final = train_model(phase_params, MODEL, shard_dir, out, root, phase)
            model, _ = load_model(out.model_dir / WEIGHTS_FILE)
            suffix = "" if name == "pretrained" else f"_{name}"
            result[f"test_accuracy{suffix}"] = accuracy(model, urls, params.evaluate.batch_size)
            curves[name] = [row["val_accuracy"] for row in read_rows(out.plots_file)]
            fit += final["fit_time_s"]
            log_test(out.model_dir, {"test_accuracy": result[f"test_accuracy{suffix}"]})
    result["labelled_images"] = final_labelled(params, shard_dir)
    result["fit_time_s"] = fit
    close_parent(uri, parent, result)
    return {"metrics": result, "curves": curves}


def final_labelled(params, shard_dir: Path) -> int:

    count = load_manifest(shard_dir)["splits"]["train"]["count"]
    return count_labelled("train", count, params.finetune.label_fraction, params.seed)


def read_rows(plots_file: Path) -> list[dict]:
    """The per-epoch rows a run wrote (numbers as floats)."""
    rows = csv.DictReader(io.StringIO(plots_file.read_text()))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def curves_csv(curves: dict[str, list[float]]) -> str:
    """One row per epoch, one val-accuracy column per variant (a DVC plot of the three curves)."""
    epochs = max(len(c) for c in curves.values())
    return history_csv(
        [
            {"epoch": e + 1, **{f"val_accuracy_{n}": c[e] for n, c in curves.items() if e < len(c)}}
            for e in range(epochs)
        ]
    )


# ---------------------------------------------------------------- MLflow parent runs


def parent_run(
    params, stage: str, shard_dir: Path, root: Path | None, init: Path | None = None
) -> tuple[str | None, str | None]:
    """(tracking URI, id) of the stage's parent run, reopened when an interrupted attempt with the same inputs
    started one."""
    if not params.tracking.enabled:
        return None, None
    root = Path(root or Path.cwd()).resolve()
    uri = mlflow_runs.tracking_uri(root)
    data_sha = sha256_file(Path(shard_dir) / "manifest.json")
    key = run_name(
        MODEL,
        params,
        data_sha,
        phase=Phase(stage, {"finetune": params.finetune.model_dump()} if stage == "finetune" else {}, init),
    )
    folder = RunFolder(storage_location(params.ray.storage_path, root), key)
    run_id = mlflow_runs.reopen_saved_run(uri, folder.read_text(RUN_RECORD))
    if run_id:
        return uri, run_id
    tags = {
        "latentzoo.stage": stage,
        "latentzoo.model": MODEL,
        "mlflow.source.git.commit": mlflow_runs.git_commit(root),
    }
    run_id = mlflow_runs.start_run(uri, f"{params.tracking.experiment_prefix}-{MODEL}", f"{stage}-{MODEL}", tags, root)
    mlflow_runs.log_params(
        uri,
        run_id,
        {MODEL: params.stacked_ae.model_dump(), "train": params.train.model_dump()}
        | ({"finetune": params.finetune.model_dump()} if stage == "finetune" else {}),
    )
    folder.write_text(RUN_RECORD, json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return uri, run_id


def close_parent(uri: str | None, run_id: str | None, metrics: dict) -> None:
    if not run_id:
        return
    mlflow_runs.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    mlflow_runs.end_run(uri, run_id)


def log_test(model_dir: Path, metrics: dict) -> None:
    """Test figures onto the phase's own MLflow run (the one that trained the weights in `model_dir`)."""

    run = json.loads((model_dir / RUN_FILE).read_text())
    if run.get("run_id"):
        mlflow_runs.log_metrics(run.get("tracking_uri") or mlflow_runs.tracking_uri(), run["run_id"], metrics)
