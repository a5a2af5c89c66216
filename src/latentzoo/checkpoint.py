"""Self-describing checkpoints (nanoGPT style): weights, optimizer, epoch, history and the model's config together.

Everything is saved as tensors, dicts, lists, strings and numbers, so it loads with
``torch.load(..., weights_only=True)`` — no pickled code ever runs on load.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentzoo.atomic import atomic_write_bytes
from latentzoo.errors import LatentzooError
from latentzoo.models import REGISTRY, build_model

CHECKPOINT_FILE = "checkpoint.pt"  # one epoch's training state, in a Ray checkpoint folder
WEIGHTS_FILE = "model.pt"  # a trained model (`weights_record`), in its DVC output folder


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename: a reader never sees half a checkpoint."""

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; a corrupt or foreign file is a clear error naming it."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LatentzooError(f"{path}: checkpoint not found") from None
    except Exception as err:
        reason = str(err).strip().split("\n")[0].split(". ")[0]  # torch's zip errors run to a paragraph
        raise LatentzooError(f"{path}: not a readable latentzoo checkpoint ({type(err).__name__}: {reason})") from None


def weights_record(model: nn.Module, model_name: str, model_config: dict, image_shape, epoch: int) -> dict:
    """The final-weights file written as a DVC output: enough to rebuild the model without params.yaml."""
    return {
        "format": 1,
        "model_name": model_name,
        "model_config": model_config,
        "image_shape": list(image_shape),
        "epoch": epoch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its weights file; returns (model in eval mode, the record without weights)."""
    record = load_state(path)
    name = record.get("model_name")
    if name not in REGISTRY:
        raise LatentzooError(f"{path}: unknown model family {name!r}")
    cfg = REGISTRY[name].config_cls.model_validate(record["model_config"])
    model = build_model(name, cfg, tuple(record["image_shape"]))
    model.load_state_dict(record["state_dict"])
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    return model.eval(), meta
