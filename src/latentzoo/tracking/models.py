"""Trained models in MLflow: logged with the PyTorch flavour, registered per family, and loaded back by reference.

What is logged is `Reconstructor(model)`: forward(x) is the family's deterministic reconstruction of x, so the
pyfunc flavour (`mlflow models predict` / `serve`) answers a batch of images (N, C, H, W) in [0, 1] with their
reconstructions. The model itself stays reachable as `.model` for sampling and encoding, so it is saved as the
eager module (pickle, not torch.export), and the package source travels with it (`code_paths`): a model loads
wherever torch and MLflow are installed.

A model reference is any of: a DVC output (`models/vae` or `models/vae/model.pt`), `runs:/<run id>/model`, or a
registry URI (`models:/latentzoo-vae/3`, `models:/latentzoo-vae/latest`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

import latentzoo
from latentzoo.checkpoint import WEIGHTS_FILE, load_model
from latentzoo.errors import LatentzooError
from latentzoo.tracking.runs import TrackedRun

ARTIFACT = "model"


def registered_name(family: str) -> str:
    return f"latentzoo-{family}"


class Reconstructor(nn.Module):
    """forward(x) = the family's deterministic reconstruction, `model.reconstruct(x)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.reconstruct(x)


def log_trained_model(run: TrackedRun, model: nn.Module, family: str, image_shape: tuple[int, int, int]) -> str | None:
    """Log `model` to `run` with the PyTorch flavour and register it as `latentzoo-<family>`; returns the
    registered version."""
    import mlflow
    from mlflow.models import infer_signature

    wrapped = Reconstructor(model).eval()
    example = torch.rand(2, *image_shape)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), wrapped(example).numpy())
    mlflow.set_tracking_uri(run.uri)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(
            wrapped,
            name=ARTIFACT,
            signature=signature,
            input_example=example.numpy(),
            registered_model_name=registered_name(family),
            code_paths=[str(Path(latentzoo.__file__).parent)],
            serialization_format="pickle",  # the eager module (torch.export's pt2 would drop sample and latents)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    return str(info.registered_model_version) if info.registered_model_version else None


def tag_version(uri: str, name: str, version: str, metrics: dict) -> None:
    """The evaluate stage's test metrics as tags of registered model `name`'s `version` (test_psnr = '18.7')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.set_model_version_tag(name, version, key, f"{value:.6g}")


def load(reference: str) -> nn.Module:
    """The trained model (in eval mode) behind a DVC output path, a `runs:/` URI or a `models:/` URI."""
    if reference.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "m-")):
        import mlflow

        try:
            wrapped = mlflow.pytorch.load_model(reference, map_location="cpu")
        except Exception as err:
            raise LatentzooError(
                f"{reference}: cannot load the model from MLflow "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
        return (wrapped.model if isinstance(wrapped, Reconstructor) else wrapped).eval()

    path = Path(reference)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise LatentzooError(
            f"{reference}: no such model (a models/<family> folder, its model.pt, runs:/<id>/model "
            f"or models:/<name>/<version>)"
        )
    return load_model(path)[0]
