"""params.yaml is validated once: every bad key or value names itself and the value, before Ray starts."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from latentzoo import params_reads
from latentzoo.config import Params, load_params, validate_params
from latentzoo.errors import ConfigError
from latentzoo.models.vae import VAEConfig


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_with_defaults():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "digits"
    assert params.models == ["vae", "vqvae", "simvq", "resvae_gan"]
    assert params.model_config_for("vae").latent_dim >= 1
    assert params.model_config_for("vqvae").codebook_size >= 1 and params.model_config_for("simvq").codebook_dim >= 1


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "lr", -1, "train.lr must be > 0, got -1"),
        ("train", "epochs", 0, "train.epochs must be >= 1, got 0"),
        ("train", "epochs", "ten", "train.epochs"),
        ("train", "num_workers", 1.5, "train.num_workers"),
        ("train", "use_gpu", "yes", "train.use_gpu"),
        ("shard", "maxcount", 0, "shard.maxcount must be >= 1, got 0"),
        ("data", "source", "csv", "data.source must be 'digits', 'idx' or 'imagefolder', got 'csv'"),
        ("data", "val_fraction", 1.5, "data.val_fraction must be < 1, got 1.5"),
        ("vae", "beta", -0.5, "vae.beta must be >= 0, got -0.5"),
        ("vae", "likelihood", "poisson", "vae.likelihood"),
        ("vqvae", "codebook_size", 0, "vqvae.codebook_size must be >= 1, got 0"),
        ("vqvae", "decay", 1.0, "vqvae.decay must be < 1, got 1.0"),
        ("vqvae", "restart_after", -5, "vqvae.restart_after must be >= 0, got -5"),
        ("simvq", "codebook_dim", 0, "simvq.codebook_dim must be >= 1, got 0"),
        ("simvq", "ema", True, "simvq.ema is not a known key"),  # SimVQ's codebook is C W^T, never EMA
        ("train", "lrr", 0.1, "train.lrr is not a known key"),
    ],
)
def test_bad_values_are_named(section, key, value, message):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    assert message in str(err.value)


def test_unknown_top_level_section_and_model():
    raw = raw_params()
    raw["trian"] = {"lr": 1}
    raw["models"] = ["vae", "nope"]
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    assert "trian is not a known key" in str(err.value)


def test_unknown_model_name():
    raw = raw_params()
    raw["models"] = ["nope"]
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        validate_params(raw)


def test_source_needing_a_path():
    raw = raw_params()
    raw["data"]["source"] = "idx"
    with pytest.raises(ConfigError, match="data.path is required"):
        validate_params(raw)


def test_fractions_must_leave_training_data():
    raw = raw_params()
    raw["data"]["val_fraction"], raw["data"]["test_fraction"] = 0.5, 0.5
    with pytest.raises(ConfigError, match="val_fraction \\+ data.test_fraction must be < 1"):
        validate_params(raw)


def test_scientific_notation_is_a_float(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lr: 2.0e-3", "lr: 1e-3"))
    assert load_params(path).train.lr == pytest.approx(1e-3)


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_stage_script_exits_nonzero_with_one_line(tmp_path: Path):
    raw = raw_params()
    raw["train"]["lr"] = -1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable,
        str(ROOT / "pipelines/train.py"),
        "--params",
        str(bad),
        "--model",
        "vae",
        "--shards",
        "x",
        "--out",
        "y",
        "--metrics",
        "m.json",
        "--plots",
        "p.csv",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: train.lr must be > 0, got -1"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- tune search space


def with_space(space: dict) -> dict:
    raw = raw_params()
    raw["tune"]["space"] = {**{model: {} for model in raw["models"]}, **space}  # every model has an entry
    return raw


def test_search_space_parses_into_ray_domains():
    from ray.tune.search.sample import Float

    from latentzoo.tuning.search import search_space

    params = validate_params(
        with_space(
            {
                "vae": {"beta": {"low": 0.5, "high": 2.0, "log": True}},
                "vqvae": {"commitment_weight": {"low": 0.1, "high": 1.0}},
            }
        )
    )
    vae, vq = search_space(params, "vae"), search_space(params, "vqvae")
    assert isinstance(vae["beta"], Float) and (vae["beta"].lower, vae["beta"].upper) == (0.5, 2.0)
    assert "LogUniform" in type(vae["beta"].sampler).__name__
    assert "LogUniform" not in type(vq["commitment_weight"].sampler).__name__
    assert search_space(params, "simvq") == {}  # an empty entry: nothing searched, training uses params.yaml


def test_every_model_needs_a_space_entry_for_its_tune_stage():
    raw = raw_params()
    del raw["tune"]["space"]["simvq"]
    with pytest.raises(ConfigError, match="tune.space: no entry for simvq; every model in `models` has one"):
        validate_params(raw)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"vae": {"betaa": {"low": 0.1, "high": 1.0}}}, "tune.space.vae.betaa is not a float field of vae"),
        ({"vae": {"latent_dim": {"low": 2, "high": 8}}}, "tune.space.vae.latent_dim is not a float field"),
        ({"vea": {"beta": {"low": 0.1, "high": 1.0}}}, "tune.space: unknown model 'vea'"),
        ({"vae": {"beta": {"low": 2.0, "high": 1.0}}}, "high must be > low, got low 2.0 and high 1.0"),
        ({"vae": {"beta": {"low": 0.0, "high": 1.0, "log": True}}}, "low must be > 0 for a log range, got 0.0"),
        ({"vae": {"beta": {"low": -1.0, "high": 1.0}}}, "tune.space.vae.beta: -1.0 is not a valid vae.beta"),
        ({"vqvae": {"decay": {"low": 0.9, "high": 1.5}}}, "tune.space.vqvae.decay: 1.5 is not a valid vqvae.decay"),
        ({"vae": {"beta": {"low": 0.1}}}, "tune.space.vae.beta.high is required"),
    ],
)
def test_bad_search_space_is_named(space, message):
    with pytest.raises(ConfigError) as err:
        validate_params(with_space(space))
    assert message in str(err.value)


def test_tuned_weights_reach_the_train_params(tmp_path):
    from latentzoo.tuning.search import trial_params
    from latentzoo.tuning.tuned import apply_tuned

    params = validate_params(raw_params())
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"model": "vae", "searched": True, "weights": {"beta": 0.37}}))
    tuned = apply_tuned(params, "vae", best)
    assert tuned.vae.beta == 0.37 and tuned.vae.latent_dim == params.vae.latent_dim
    assert tuned.train == params.train  # the train stage keeps its own epochs and workers
    trial = trial_params(params, "vae", {"beta": 2.0})
    assert trial.vae.beta == 2.0 and trial.train.epochs == params.tune.epochs
    assert trial.train.num_workers == 1 and trial.train.torch_threads == params.tune.cpus_per_trial
    best.write_text(yaml.safe_dump({"model": "simvq", "weights": {}}))
    with pytest.raises(Exception, match="holds weights for model 'simvq', not 'vae'"):
        apply_tuned(params, "vae", best)


def test_a_stage_records_the_params_keys_it_reads_and_not_those_code_set():
    with params_reads.recorded() as reads:
        params = load_params(ROOT / "params.yaml")
        assert reads == set()  # validation reads everything; it is not the stage reading
        params.seed, params.train.lr, params.tune.space_for("vae"), params.vae  # a section itself: navigation
        trial = params.updated(**{"train.epochs": 3, "vae.beta": 2.0})
        trial.train.epochs, trial.vae.beta, trial.evaluate.model_dump()  # set by code; a dump is not a read
        pickle.dumps(trial.vae)  # shipped to a Ray worker: read whole, but for the key code set
    vae_keys = {f"vae.{k}" for k in VAEConfig.model_fields} - {"vae.beta"}
    assert reads == {"seed", "train.lr", "tune.space.vae", *vae_keys}
    assert params.train.lr > 0 and not params_reads.recording()  # outside the block nothing is recorded
