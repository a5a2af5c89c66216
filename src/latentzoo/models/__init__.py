"""Model families, by the name params.yaml uses (`models: [vae]` and a `vae:` section).

Adding a family is adding one file with its config section and module, one entry here and its section in
config.Params (tests/test_config.py checks the two agree).
Must not import latentzoo.config: config.Params holds one section per REGISTRY entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from latentzoo.errors import ConfigError
from latentzoo.models.base import Adversarial, Coded, Generative, ModelOutput, Supervised, Variational, frozen
from latentzoo.schema import Section


@dataclass(frozen=True)
class ModelEntry:
    """A family: the module holding its params section class and its module class, built as model_cls(cfg,
    image_shape). The module is imported at first use, so code that uses one family (a benchmark of the VAE)
    imports that family's files only, and a change to another family's file does not touch it."""

    module: str
    config_name: str
    model_name: str

    @property
    def config_cls(self) -> type[Section]:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def model_cls(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.model_name)


REGISTRY: dict[str, ModelEntry] = {
    "vae": ModelEntry("latentzoo.models.vae", "VAEConfig", "VAE"),
    "vqvae": ModelEntry("latentzoo.models.vqvae", "VQVAEConfig", "VQVAE"),
    "simvq": ModelEntry("latentzoo.models.vqvae", "SimVQConfig", "VQVAE"),
    "stacked_ae": ModelEntry("latentzoo.models.stacked_ae", "StackedAEConfig", "StackedAutoencoder"),
    "resvae_gan": ModelEntry("latentzoo.models.resvae_gan", "ResVAEGANConfig", "ResVAEGAN"),
}


def build_model(name: str, cfg: Section, image_shape: tuple[int, int, int]) -> nn.Module:
    """The model of family `name` for (C, H, W) images; ConfigError for an unknown name or shape it can't take."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}, known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"model {name!r} needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
    return entry.model_cls(cfg, tuple(image_shape))


# What the driver layer (loop, evaluation, CLI) sees of a model: the capability interfaces of models.base.
__all__ = [
    "REGISTRY",
    "Adversarial",
    "Coded",
    "Generative",
    "ModelEntry",
    "ModelOutput",
    "Supervised",
    "Variational",
    "build_model",
    "frozen",
]
