"""Trained models in MLflow: logged as weights (no pickled model), registered per family, loaded back by reference.

What is logged is the pyfunc model of `tracking.pyfunc`: the weights file (`model.pt`, tensors and plain values
only) as an artifact, the package source beside it (`code_paths`), and predict(x) = the family's deterministic
reconstruction, so `mlflow models predict` / `serve` answer a batch of images (N, C, H, W) in [0, 1] with their
reconstructions.

Loading a logged model here (`load`) downloads its files and reads the weights file alone, with
`torch.load(weights_only=True)`, into the installed latentzoo classes: whatever else the logged model holds (a
planted `python_model.pkl`, say) is never unpickled. A model logged by an older latentzoo with the PyTorch flavour
(a pickled module) is refused with a message saying so.

A model reference is any of: a DVC output (`models/vae` or `models/vae/model.pt`), `runs:/<run id>/model`, or a
registry URI (`models:/latentzoo-vae/3`, `models:/latentzoo-vae/latest`, `models:/latentzoo-vae@champion`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

import latentzoo
from latentzoo.checkpoint import WEIGHTS_FILE, load_model
from latentzoo.errors import LatentzooError
from latentzoo.tracking.pyfunc import WEIGHTS, ReconstructionModel
from latentzoo.tracking.runs import TrackedRun

ARTIFACT = "model"
CHAMPION = "champion"  # the alias of a family's best registered version


def registered_name(family: str) -> str:
    return f"latentzoo-{family}"


class Reconstructor(nn.Module):
    """forward(x) = the family's deterministic reconstruction, `model.reconstruct(x)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.reconstruct(x)


def log_trained_model(run: TrackedRun, weights: Path, family: str) -> str | None:
    """Log the weights file `weights` to `run` as the pyfunc model of `tracking.pyfunc` and register it as
    `latentzoo-<family>`; returns the registered version."""
    import mlflow
    from mlflow.models import infer_signature

    model, meta = load_model(weights)
    example = torch.rand(2, *meta["image_shape"])
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model.reconstruct(example).numpy())
    # MLflow warns that a Python object as python_model is cloudpickled: ours is pickled by reference (a class of
    # the shipped package, no state), and latentzoo never unpickles it (`load`).
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    with fluent_tracking_uri(run.uri), mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=ReconstructionModel(),
            artifacts={WEIGHTS: str(weights)},
            signature=signature,
            input_example=example.numpy(),
            registered_model_name=registered_name(family),
            code_paths=[str(Path(latentzoo.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    return str(info.registered_model_version) if info.registered_model_version else None


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for the block (`pyfunc.log_model` has no client form); afterwards the
    process's tracking URI and MLFLOW_TRACKING_URI are what they were (`mlflow.set_tracking_uri` sets both)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils  # where set_tracking_uri keeps the URI (None: unset)

    before, variable = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable as well
        if variable is not None:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def tag_version(uri: str, name: str, version: str, metrics: dict) -> None:
    """The evaluate stage's test metrics as tags of registered model `name`'s `version` (test_psnr = '18.7')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.set_model_version_tag(name, version, key, f"{value:.6g}")


def promote_champion(uri: str, name: str, version: str, metrics: dict, key: str) -> bool:
    """Move registered model `name`'s alias `champion` to `version` when its test metric `key` (lower is better)
    beats the current champion's (as that version's tags hold it), or there is no champion yet. Returns whether
    the alias moved. (Aliases replace the stages MLflow deprecated in 2.9: `models:/latentzoo-vae@champion`.)"""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    value = metrics.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    client = MlflowClient(tracking_uri=uri)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        current = None
    if current is not None and current.version != str(version) and key in current.tags:
        if float(current.tags[key]) <= value:
            return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "champion_metric", key)
    return True


def load(reference: str) -> nn.Module:
    """The trained model (in eval mode) behind a DVC output path, a `runs:/` URI or a `models:/` URI."""
    if reference.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "m-")):
        with tempfile.TemporaryDirectory() as tmp:
            return load_model(logged_weights(reference, Path(tmp)))[0]
    path = Path(reference)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise LatentzooError(
            f"{reference}: no such model (a models/<family> folder, its model.pt, runs:/<id>/model "
            f"or models:/<name>/<version>)"
        )
    return load_model(path)[0]


def logged_weights(reference: str, into: Path) -> Path:
    """Download the logged model `reference` into `into` and return its weights file (found through its MLmodel
    file, plain YAML); nothing of it is unpickled."""
    import mlflow

    uri = f"models:/{reference}" if reference.startswith("m-") else reference
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except Exception as err:
        raise LatentzooError(
            f"{reference}: cannot load the model from MLflow ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        ) from None
    spec = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").exists() else {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "weights" not in artifacts:
        raise LatentzooError(
            f"{reference}: not a latentzoo weights model (logged by an older latentzoo as a pickled PyTorch module, "
            f"which is never unpickled here); run its train stage again to log it as weights"
        )
    return local / artifacts["weights"]["path"]
