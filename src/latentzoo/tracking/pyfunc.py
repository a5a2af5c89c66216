"""The model MLflow serves (`mlflow models serve`, the pyfunc flavour): the trained model's weights file as an
artifact, loaded with `torch.load(weights_only=True)` into the latentzoo classes the model ships with
(`code_paths`), and predict(x) = the family's deterministic reconstruction of a batch (N, C, H, W) in [0, 1].

No model is pickled: what MLflow pickles is this small class by reference. latentzoo itself never loads a logged
model through MLflow (`tracking.models.load` reads the weights file alone), so a planted pickle in a logged model
never runs there.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from latentzoo.checkpoint import load_model

WEIGHTS = "weights"  # the artifact key of the weights file (model.pt)


# MLflow's PythonModel warns, when a subclass is made, asking for type hints it would validate pandas-style inputs
# with, under a warnings filter of its own that no "ignore" overrides; recording the warning drops it. A tensor model
# is validated by its logged signature instead.
with warnings.catch_warnings(record=True):

    class ReconstructionModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            self.model = load_model(Path(context.artifacts[WEIGHTS]))[0]

        def predict(self, context, model_input, params=None) -> np.ndarray:
            x = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
            with torch.no_grad():
                return self.model.reconstruct(x).numpy()
