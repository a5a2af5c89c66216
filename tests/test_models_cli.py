"""Trained models in MLflow (logged, registered, tagged) and the `latentzoo` CLI that uses them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentzoo.checkpoint import load_model
from latentzoo.cli import main
from latentzoo.tracking.models import Reconstructor, load
from latentzoo.training.trainer import TrainOutputs, train_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(ray_cluster, digits_shards, tmp_path_factory):
    """A tiny VAE trained by the train stage with tracking on, in Ray Train's local mode (on Ray's workers, against
    a tracking server: test_models_are_registered_on_an_mlflow_server): logged and registered as latentzoo-vae."""
    from conftest import TINY, make_params

    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    params = make_params(**{**TINY, "train.num_workers": 0, "train.epochs": 1, "ray.storage_path": str(work / "ray")})
    out = TrainOutputs(work / "models/vae", work / "train.json", work / "train.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        train_model(params, "vae", digits_shards, out, root=work)
    return work, uri, out.model_dir


@pytest.fixture
def registry(trained, monkeypatch):
    work, uri, model_dir = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return trained


def test_the_train_stage_registers_its_model(registry):
    _, uri, model_dir = registry
    run = json.loads((model_dir / "mlflow_run.json").read_text())
    assert run["registered_model"] == "latentzoo-vae" and run["model_version"] == "1"
    from mlflow.tracking import MlflowClient

    version = MlflowClient(uri).get_model_version("latentzoo-vae", "1")
    assert version.run_id == run["run_id"]


def test_a_registry_uri_loads_the_same_model(registry):
    _, _, model_dir = registry
    local, _ = load_model(model_dir / "model.pt")
    remote = load("models:/latentzoo-vae/1")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(Reconstructor(remote)(x), Reconstructor(local)(x))
        assert torch.equal(remote.encode(x), local.encode(x))
    assert isinstance(load("models:/latentzoo-vae/latest"), type(local))
    run_id = json.loads((model_dir / "mlflow_run.json").read_text())["run_id"]
    by_run = load(f"runs:/{run_id}/model")  # the run's logged model, without the registry
    assert torch.equal(by_run.encode(x), local.encode(x))


def test_the_cli_writes_what_it_promises(registry, digits_shards, tmp_path, capsys):
    _, _, model_dir = registry
    main(["sample", "--model", "models:/latentzoo-vae/latest", "-n", "16", "-o", str(tmp_path / "s.png")])
    assert Image.open(tmp_path / "s.png").size[0] > 8
    main(
        [
            "reconstruct",
            "--model",
            str(model_dir),
            "--shards",
            str(digits_shards),
            "-n",
            "8",
            "-o",
            str(tmp_path / "r.png"),
        ]
    )
    assert Image.open(tmp_path / "r.png").size[1] > Image.open(tmp_path / "r.png").size[0] / 8
    main(
        [
            "encode",
            "--model",
            str(model_dir / "model.pt"),
            "--shards",
            str(digits_shards),
            "-n",
            "10",
            "-o",
            str(tmp_path / "z.npy"),
        ]
    )
    assert np.load(tmp_path / "z.npy").shape == (10, 4)  # TINY latent_dim
    assert "latentzoo encode: wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "models:/latentzoo-nope/1", "-o", "x.png"], "models:/latentzoo-nope/1: cannot load"),
        (["sample", "--model", "no/such/dir", "-o", "x.png"], "no/such/dir: no such model"),
        (["reconstruct", "--model", "MODEL", "--images", "BIG", "-o", "x.png"], "image is 10x12 with 3 channel"),
        (["encode", "--model", "MODEL", "-o", "x.npy"], "give the images"),
    ],
)
def test_bad_inputs_are_one_clear_line(registry, tmp_path, capsys, argv, message):
    _, _, model_dir = registry
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(big)
    argv = [str(model_dir) if a == "MODEL" else str(big) if a == "BIG" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_pyfunc_flavour_serves_reconstructions_over_http(registry, tmp_path):
    """`mlflow models serve` on loopback answers /invocations with the model's reconstructions."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from conftest import wait_until_up

    from latentzoo.local_cluster import free_port

    _, uri, model_dir = registry
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [
            mlflow_cli,
            "models",
            "serve",
            "-m",
            "models:/latentzoo-vae/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,  # it runs uvicorn from the venv
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        x = torch.rand(3, 1, 8, 8)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    served = torch.tensor(answer["predictions"])
    local, _ = load_model(model_dir / "model.pt")
    with torch.no_grad():
        assert torch.allclose(served, Reconstructor(local)(x), atol=1e-5)


def test_models_are_registered_on_an_mlflow_server(ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_server):
    params = tiny_params(**{"train.num_workers": 1, "train.epochs": 1, "ray.storage_path": str(tmp_path / "ray")})
    out = TrainOutputs(tmp_path / "models/vae", tmp_path / "train.json", tmp_path / "train.csv")
    train_model(params, "vae", digits_shards, out, root=tmp_path)
    run = json.loads((out.model_dir / "mlflow_run.json").read_text())
    assert run["tracking_uri"] == mlflow_server and run["model_version"] == "1"
    served = load("models:/latentzoo-vae/1")  # through the server's registry and proxied artifacts
    local, _ = load_model(out.model_dir / "model.pt")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(Reconstructor(served)(x), Reconstructor(local)(x))


class Payload:
    """Unpickling this creates `path`: the stand-in for code an attacker plants in a logged model."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_pickle_in_a_logged_model_never_runs(registry, tmp_path, monkeypatch):
    """Someone with write access to the artifact store swaps a registered model's files for pickles whose loading
    runs code. latentzoo reads the weights file alone, with weights_only: the payload does not run (MLflow's own
    pyfunc loader, by contrast, does run it: the plant is real)."""
    import contextlib
    import pickle
    import urllib.parse

    import mlflow

    from latentzoo.errors import LatentzooError
    from latentzoo.tracking.models import log_trained_model
    from latentzoo.tracking.runs import TrackedRun

    _, _, model_dir = registry
    run = TrackedRun.load(model_dir / "mlflow_run.json")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = mlflow.get_tracking_uri()
    version = log_trained_model(run, model_dir / "model.pt", "vae")  # a version of its own to tamper with
    assert mlflow.get_tracking_uri() == default and "MLFLOW_TRACKING_URI" not in os.environ  # the process's own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.uri)
    location = mlflow.MlflowClient().get_model_version_download_uri("latentzoo-vae", version)
    stored = Path(urllib.parse.urlparse(location).path)  # the local store's copy of the logged model
    marker = tmp_path / "payload-ran"
    (stored / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))

    model = load(f"models:/latentzoo-vae/{version}")  # what `latentzoo sample --model models:/...` does
    main(["sample", "--model", f"models:/latentzoo-vae/{version}", "-n", "4", "-o", str(tmp_path / "s.png")])
    assert not marker.exists() and model.reconstruct(torch.rand(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    with contextlib.suppress(Exception):  # it fails after the payload ran
        mlflow.pyfunc.load_model(f"models:/latentzoo-vae/{version}")
    assert marker.exists()  # MLflow's loader unpickled the plant
    marker.unlink()

    weights = next(stored.rglob("model.pt"))
    weights.write_bytes(pickle.dumps(Payload(marker)))  # the weights file itself a pickle
    with pytest.raises(LatentzooError, match="not a readable latentzoo checkpoint"):
        load(f"models:/latentzoo-vae/{version}")
    assert not marker.exists()
