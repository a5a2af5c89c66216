"""The tune stage's result as the train stage reads it: `tune/<model>/best.yaml`'s weights set in the params.

Kept apart from the search itself, so that the train stage's code (and its DVC dependencies) holds no Ray Tune.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from latentzoo.config import Params
from latentzoo.errors import TrainingError
from latentzoo.schema import Section


def with_weights(params: Params, model_name: str, weights: dict[str, float]) -> Params:
    """Params with `weights` set in the model's section (validated again, so a bad weight is a clear error)."""
    return params.updated(**{f"{model_name}.{key}": value for key, value in weights.items()})


def section_with_weights(section: Section, weights: dict[str, float]) -> Section:
    """A model's section with `weights` set, validated again (a tune trial's weights, in the trial's process)."""
    return type(section).model_validate({**section.model_dump(), **weights})


def apply_tuned(params: Params, model_name: str, tuned_file: Path):
    """The train stage's params: params.yaml with the weights the tune stage found (`tune/<model>/best.yaml`)."""
    tuned = yaml.safe_load(Path(tuned_file).read_text()) or {}
    if tuned.get("model") != model_name:
        raise TrainingError(f"{tuned_file}: holds weights for model {tuned.get('model')!r}, not {model_name!r}")
    return with_weights(params, model_name, tuned.get("weights") or {})
