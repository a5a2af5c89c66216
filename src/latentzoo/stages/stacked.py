"""The pretrain and finetune stages of the stacked autoencoder."""

from __future__ import annotations

from pathlib import Path

from latentzoo.atomic import atomic_write_json, atomic_write_text
from latentzoo.checkpoint import WEIGHTS_FILE
from latentzoo.config import Params
from latentzoo.training.layerwise import curves_csv, finetune_stack, pretrain_stack
from latentzoo.training.outputs import history_csv


def pretrain_stage(params: Params, shard_dir: Path, out_dir: Path, metrics_file: Path, plots_file: Path) -> dict:
    done = pretrain_stack(params, Path(shard_dir), Path(out_dir))
    atomic_write_json(Path(metrics_file), done["metrics"])
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
    atomic_write_json(Path(metrics_file), done["metrics"])
    Path(plots_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(plots_file), curves_csv(done["curves"]))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in done["metrics"].items() if k.startswith("test_accuracy"))
    print(
        f"finetune: stacked_ae with {params.finetune.label_fraction:.0%} of the labels "
        f"({done['metrics']['labelled_images']} images): {shown}"
    )
    return done["metrics"]
