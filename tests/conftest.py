"""Shared fixtures: one Ray instance per test session, tiny digits shards, an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to a user's cluster or tracking server.
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def make_params(**overrides):
    """Validated Params from the repo's params.yaml with dotted overrides, e.g. {"train.epochs": 2}."""
    from latentzoo.config import validate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return validate_params(raw)


TINY = {
    "vae.latent_dim": 4,
    "vae.hidden_channels": 8,
    "vae.fc_hidden": 32,
    "vqvae.hidden_channels": 8,
    "vqvae.codebook_dim": 8,
    "vqvae.codebook_size": 64,
    "simvq.hidden_channels": 8,
    "simvq.codebook_dim": 8,
    "simvq.codebook_size": 64,
    "train.batch_size": 32,
    "train.epochs": 2,
    "train.lr": 0.003,
}


@pytest.fixture
def tiny_params():
    return lambda **kw: make_params(**{**TINY, **kw})


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled digits, prepared and sharded (500 per shard → uneven train shards: 500, 500, 257)."""
    from latentzoo.data.prepare import prepare
    from latentzoo.data.shards import write_shards

    params = make_params()
    base = tmp_path_factory.mktemp("digits")
    prepare(params.data, params.seed, base / "prepared")
    write_shards(base / "prepared", base / "shards", maxcount=500, progress=False)
    return base / "shards"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the whole session: Ray takes tens of seconds to start."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    yield
    ray.shutdown()
