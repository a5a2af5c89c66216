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
import shutil
from pathlib import Path

from latentzoo.atomic import atomic_dir
from latentzoo.checkpoint import WEIGHTS_FILE, load_model
from latentzoo.config import Params
from latentzoo.data.loader import count_labelled
from latentzoo.data.shards import load_manifest, sha256_file
from latentzoo.errors import ConfigError
from latentzoo.evaluation.classify import accuracy, layer_errors, test_urls
from latentzoo.storage import RunFolder, project_root, storage_location
from latentzoo.tracking.runs import RUN_FILE, TrackedRun
from latentzoo.training.job import Phase
from latentzoo.training.outputs import TrainOutputs, history_csv
from latentzoo.training.trainer import run_name, train_model

MODEL = "stacked_ae"


def check_classes(params: Params, shard_dir: Path) -> None:
    """The classifier head must have one output per class of the data."""
    found = load_manifest(shard_dir).get("num_classes")
    if found is not None and found != params.stacked_ae.num_classes:
        raise ConfigError(
            f"stacked_ae.num_classes is {params.stacked_ae.num_classes} but "
            f"{Path(shard_dir) / 'manifest.json'} has {found} classes; set it to {found}"
        )


def phase_outputs(tmp: Path, name: str) -> TrainOutputs:
    return TrainOutputs(tmp / name, tmp / f"{name}.json", tmp / f"{name}.csv")


def pretrain_stack(params: Params, shard_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Pretrain the L layers greedily; write the stack (`out_dir/model.pt`) and each layer's run under
    `out_dir/layer-<k>/`. Returns {"layers": [final row of each layer], "test": per-layer test errors, ...}."""
    cfg, shard_dir = params.stacked_ae, Path(shard_dir)
    check_classes(params, shard_dir)
    phase_params = params.updated(
        **{"train.epochs": cfg.pretrain_epochs, "train.lr": cfg.pretrain_lr, "train.lr_schedule": "constant"}
    )
    parent = parent_run(phase_params, "pretrain", shard_dir, root)
    finals, rows = [], []
    with atomic_dir(out_dir) as tmp:
        init = None
        for k in range(1, len(cfg.layers) + 1):
            phase = Phase(f"layer-{k}", {"mode": "pretrain", "layer": k}, init_weights=init, parent=parent)
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
    close_parent(parent, result)
    return {"metrics": result, "rows": rows}


def finetune_stack(
    params: Params, pretrained_dir: Path, shard_dir: Path, out_dir: Path, root: Path | None = None
) -> dict:
    """Fine-tune the pretrained stack with labels, beside the random-init baseline and the linear probe (each as
    set in the finetune section); write each under `out_dir/<variant>/`; return test accuracies and curves."""
    ft, shard_dir = params.finetune, Path(shard_dir)
    check_classes(params, shard_dir)
    pretrained = Path(pretrained_dir) / WEIGHTS_FILE
    variants = [("pretrained", "finetune", pretrained)]
    variants += [("random", "finetune", None)] if ft.baseline else []
    variants += [("probe", "probe", pretrained)] if ft.probe else []
    phase_params = params.updated(**{"train.epochs": ft.epochs, "train.lr": ft.lr, "train.lr_schedule": ft.lr_schedule})
    parent = parent_run(phase_params, "finetune", shard_dir, root, pretrained)
    urls = test_urls(shard_dir)
    result, curves, fit = {"label_fraction": ft.label_fraction, "epochs": ft.epochs}, {}, 0.0
    with atomic_dir(out_dir) as tmp:
        for name, mode, init in variants:
            noise = ft.model_dump(include={"dropout", "input_corruption", "max_shift"}) if mode == "finetune" else {}
            args = {"mode": mode, **noise}
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
    close_parent(parent, result)
    return {"metrics": result, "curves": curves}


def final_labelled(params: Params, shard_dir: Path) -> int:

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
    params: Params, stage: str, shard_dir: Path, root: Path | None, init: Path | None = None
) -> TrackedRun | None:
    """The stage's parent run, reopened when an interrupted attempt with the same inputs started one."""
    root = project_root(root)
    data_sha = sha256_file(Path(shard_dir) / "manifest.json")
    key = run_name(
        MODEL,
        params,
        data_sha,
        phase=Phase(stage, {"finetune": params.finetune.model_dump()} if stage == "finetune" else {}, init),
    )
    folder = RunFolder(storage_location(params.ray.storage_path, root), key)
    logged = {MODEL: params.stacked_ae.model_dump(), "train": params.train.model_dump()}
    if stage == "finetune":
        logged["finetune"] = params.finetune.model_dump()
    tags = {"latentzoo.stage": stage, "latentzoo.model": MODEL}
    return TrackedRun.open(
        params.tracking, folder, family=MODEL, name=f"{stage}-{MODEL}", tags=tags, params=logged, root=root
    )


def close_parent(run: TrackedRun | None, metrics: dict) -> None:
    if run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.finish()


def log_test(model_dir: Path, metrics: dict) -> None:
    """Test figures onto the phase's own MLflow run (the one that trained the weights in `model_dir`)."""

    run = TrackedRun.load(model_dir / RUN_FILE)
    if run:
        run.log_metrics(metrics)
