"""Beyond 28×28: every family at 32×32 and 64×64 RGB, with its depth from config (`levels`, f = 2^levels).

The images are real: sklearn's digits, each upscaled, padded and drawn in a colour of its own on a coloured
background, written as a PNG image folder. Each size goes through the stages' own functions (prepare, shard,
classifier, the training loop each Ray worker runs, evaluate, report) without Ray or DVC, so this checks that the
shapes hold, the losses fall and the evaluate and report stages handle RGB."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_params
from PIL import Image
from sklearn.datasets import load_digits

from latentzoo.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, load_state, save_state, weights_record
from latentzoo.errors import ConfigError
from latentzoo.models import build_model
from latentzoo.stages.classifier import classifier_stage
from latentzoo.stages.evaluate import evaluate_stage
from latentzoo.stages.prepare import prepare_stage
from latentzoo.stages.report import report_stage
from latentzoo.stages.shard import shard_stage
from latentzoo.training.job import training_data

FAMILIES = ("vae", "vqvae", "simvq", "resvae_gan", "stacked_ae")
LEVELS = {32: 2, 64: 3}  # f = 4 and 8: an 8x8 latent map at both sizes


def colour_digits(folder: Path, size: int, per_class: int = 24) -> Path:
    """`per_class` digits per class as size×size RGB PNGs: scaled up by an integer factor, padded to `size`, the
    strokes in one random colour over a darker random background."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    scale = (size - 8) // 8
    pad = (size - 8 * scale) // 2
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            grey = np.kron(digits.images[index] / 16.0, np.ones((scale, scale)))
            grey = np.pad(grey, pad)[:, :, None]
            ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.3, 3)
            rgb = (grey * ink + (1 - grey) * paper) * 255
            Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(folder / str(label) / f"{i}.png")
    return folder


def rgb_params(folder: Path, size: int, **overrides):
    levels = LEVELS[size]
    return make_params(
        **{
            "data.source": "imagefolder",
            "data.path": str(folder),
            "data.image_size": size,
            "data.channels": 3,
            "shard.maxcount": 50,
            "vae.latent_dim": 8,
            "vae.hidden_channels": 8,
            "vae.fc_hidden": 32,
            "vae.levels": levels,
            "vqvae.hidden_channels": 8,
            "vqvae.codebook_dim": 8,
            "vqvae.codebook_size": 32,
            "vqvae.levels": levels,
            "simvq.hidden_channels": 8,
            "simvq.codebook_dim": 8,
            "simvq.codebook_size": 32,
            "simvq.levels": levels,
            "resvae_gan.width": 4,
            "resvae_gan.blocks": 0,
            "resvae_gan.latent_channels": 2,
            "resvae_gan.disc_width": 8,
            "resvae_gan.disc_start": 4,
            "resvae_gan.levels": levels,
            "stacked_ae.layers": [64, 16],
            "train.batch_size": 16,
            "train.epochs": 3,
            "train.lr": 0.003,
            "train.num_workers": 1,
            "classifier.epochs": 2,
            "classifier.width": 8,
            "classifier.feature_dim": 16,
            "classifier.num_samples": 16,
            "evaluate.nll_samples": 4,
            "evaluate.grid_size": 8,
            "tracking.enabled": False,
            **overrides,
        }
    )


def one_process_session(run_dir: Path):
    """A one-process stand-in for a Ray Train worker's session: checkpoints kept as Ray does."""
    import ray.train

    from latentzoo.training.loop import Session

    def report(row, checkpoint=None):
        shutil.copytree(checkpoint.path, run_dir / f"checkpoint_{row['epoch']:06d}", dirs_exist_ok=True)

    return Session(0, 1, 1, lambda: None, report, ray.train.Checkpoint, lambda m: m, torch.device("cpu"))


def train_family(params, family: str, shards: Path, work: Path) -> list[dict]:
    """Train `family` with the workers' loop; its weights as the train stage writes them; the per-epoch rows."""
    from latentzoo.training.loop import run_loop

    run = work / f"run-{family}"
    run.mkdir(parents=True)
    data = training_data(params, family, shards)
    run_loop(data.job(params, family), one_process_session(run))
    state = load_state(run / f"checkpoint_{params.train.epochs:06d}" / CHECKPOINT_FILE)
    model = build_model(family, params.model_config_for(family), data.image_shape)
    model.load_state_dict(state["model"])
    config = params.model_config_for(family).model_dump()
    (work / "models" / family).mkdir(parents=True)
    save_state(work / "models" / family / WEIGHTS_FILE, weights_record(model, family, config, data.image_shape, 3))
    return state["history"]


@pytest.mark.parametrize("size", sorted(LEVELS))
def test_every_family_trains_evaluates_and_reports_on_rgb_images(tmp_path, size):
    folder = colour_digits(tmp_path / "images", size)
    params = rgb_params(folder, size)
    prepare_stage(params, tmp_path / "prepared")
    shard_stage(params, tmp_path / "prepared", tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["image_shape"] == [3, size, size]
    classifier_stage(params, tmp_path / "shards", tmp_path / "classifier", tmp_path / "metrics" / "classifier.json")

    for family in FAMILIES:
        history = train_family(params, family, tmp_path / "shards", tmp_path)
        losses = [row["train_loss"] for row in history]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (family, losses)
        model = build_model(family, params.model_config_for(family), (3, size, size)).eval()
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            assert model.reconstruct(x).shape == x.shape, family
            if hasattr(model, "sample"):
                assert model.sample(2).shape == x.shape, family
            if family in ("vqvae", "simvq"):
                assert model.encode(x).shape == (2, 8, 8)  # f = 2^levels: an 8x8 code map at 32 and at 64
        if family == "stacked_ae":
            continue  # judged by its accuracy in the pretrain/finetune stages, not evaluated here
        result = evaluate_stage(
            params,
            tmp_path / "models" / family,
            tmp_path / "shards",
            tmp_path / "metrics" / "evaluate" / f"{family}.json",
            tmp_path / "plots" / "evaluate" / family,
            classifier=tmp_path / "classifier" / WEIGHTS_FILE,
        )
        assert 0 < result["test_mse"] < 0.2 and result["test_psnr"] > 7, (family, result)
        assert math.isfinite(result["test_fid_recon"]), family
        grid = Image.open(tmp_path / "plots" / "evaluate" / family / "reconstructions.png")
        assert grid.mode == "RGB" and grid.size[0] > 2 * size  # originals beside reconstructions, in colour

    evaluated = [f for f in FAMILIES if f != "stacked_ae"]
    params = rgb_params(folder, size, models=evaluated)
    report = report_stage(
        params,
        tmp_path / "metrics" / "evaluate",
        tmp_path / "plots" / "train",
        tmp_path / "plots" / "evaluate",
        tmp_path / "report",
    )
    text = Path(report).read_text()
    assert all(family in text for family in evaluated)


@pytest.mark.parametrize("family", ["vae", "vqvae", "simvq", "resvae_gan"])
def test_a_depth_the_image_size_does_not_divide_is_one_clear_error(family):
    params = make_params(**{f"{family}.levels": 4})  # f = 16 on 28x28
    with pytest.raises(ConfigError, match=rf"{family}\.levels 4 needs height and width divisible by 16"):
        build_model(family, params.model_config_for(family), (1, 28, 28))


def test_the_default_depth_keeps_the_architecture_of_earlier_checkpoints():
    """levels: 2 builds the same conv parameters, by name and shape, as the fixed two-level encoder and decoder
    did (the checkpoints trained before `levels` existed load as they are)."""
    model = build_model("vae", make_params().model_config_for("vae"), (1, 28, 28))
    convs = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.ndim == 4}
    assert convs == {
        "encoder.0.0.weight": (32, 1, 4, 4),
        "encoder.0.2.weight": (64, 32, 4, 4),
        "decoder.5.0.weight": (64, 32, 4, 4),
        "decoder.5.2.weight": (32, 1, 4, 4),
    }
