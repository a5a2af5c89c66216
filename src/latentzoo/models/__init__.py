"""Model families, by the name params.yaml uses (`models: [vae]` and a `vae:` section).

Adding a family is adding one file with its config section and module, one entry here and its section in
config.Params (tests/test_config.py checks the two agree).
Must not import latentzoo.config: config.Params holds one section per REGISTRY entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from latentzoo.errors import ConfigError
from latentzoo.models.base import ModelOutput
from latentzoo.models.resvae_gan import ResVAEGAN, ResVAEGANConfig
from latentzoo.models.stacked_ae import StackedAEConfig, StackedAutoencoder
from latentzoo.models.vae import VAE, VAEConfig
from latentzoo.models.vqvae import VQVAE, SimVQConfig, VQVAEConfig
from latentzoo.schema import Section


@dataclass(frozen=True)
class ModelEntry:
    """A family's params section class and its module class, built as model_cls(cfg, image_shape)."""

    config_cls: type[Section]
    model_cls: type[nn.Module]


REGISTRY: dict[str, ModelEntry] = {
    "vae": ModelEntry(VAEConfig, VAE),
    "vqvae": ModelEntry(VQVAEConfig, VQVAE),
    "simvq": ModelEntry(SimVQConfig, VQVAE),
    "stacked_ae": ModelEntry(StackedAEConfig, StackedAutoencoder),
    "resvae_gan": ModelEntry(ResVAEGANConfig, ResVAEGAN),
}


def build_model(name: str, cfg: Section, image_shape: tuple[int, int, int]) -> nn.Module:
    """The model of family `name` for (C, H, W) images; ConfigError for an unknown name or shape it can't take."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}, known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"model {name!r} needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
    return entry.model_cls(cfg, tuple(image_shape))


__all__ = [
    "REGISTRY",
    "ModelEntry",
    "ModelOutput",
    "ResVAEGAN",
    "ResVAEGANConfig",
    "SimVQConfig",
    "StackedAEConfig",
    "StackedAutoencoder",
    "VAE",
    "VAEConfig",
    "VQVAE",
    "VQVAEConfig",
    "build_model",
]
