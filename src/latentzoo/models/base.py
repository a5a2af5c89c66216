"""The one interface every model family implements, so one training loop and one evaluation serve them all.

Every family is a `LatentModel`: `model(x)` returns a `ModelOutput`, `encode(x)` its deterministic latent,
`reconstruct(x)` its deterministic reconstruction, `optimizer_groups()` what the training loop's optimizer trains.
What only some families can do is declared by the small protocols below, and asked with `isinstance`:

    Generative   sample(n): images decoded from the prior                   (vae, resvae_gan)
    Variational  posterior(x) = (mu, logvar) of q(z|x), decoder_nll(z, x)     (vae, resvae_gan)
    Coded        codebook_size K: `ModelOutput.codes` are indices in 0..K-1  (vqvae, simvq)
    Adversarial  a critic D with its own optimizer groups and loss          (resvae_gan)
    Supervised   num_classes: `ModelOutput.logits` are class scores         (stacked_ae)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class ModelOutput:
    """What `model(x)` returns.

    recon:   reconstruction of x in image space, values in [0, 1], same shape as x (B, C, H, W); a classifier
             step in training may leave it None.
    losses:  named, already weighted loss terms; the training objective is their sum (`total`).
    metrics: detached per-batch statistics for logging, e.g. ``neg_elbo`` in nats per image.
    codes:   discrete latent indices (B, ...) of a `Coded` family; the training loop and evaluation count them
             into codebook utilisation and perplexity.
    logits:  class scores (B, classes) of a `Supervised` family.
    fakes:   the generated images an `Adversarial` family wants its critic to reject this step (reconstructions,
             and prior samples); None: the critic sees `recon`.
    """

    recon: Tensor | None
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)
    codes: Tensor | None = None
    logits: Tensor | None = None
    fakes: Tensor | None = None

    @property
    def total(self) -> Tensor:
        if not self.losses:
            return torch.zeros(())
        return torch.stack(list(self.losses.values())).sum()


class LatentModel(nn.Module):
    """Base class of every family.

    forward(x, generator=None, *, step=None, labels=None) -> ModelOutput
        x (B, C, H, W) in [0, 1]; `generator` seeds the family's noise (sampled z, binarisation, masking);
        `step`: optimizer steps taken before this batch (the training loop passes it; a family with a schedule
        reads it); `labels` (B,): class labels (a family that trains on them reads them).
    """

    image_shape: tuple[int, int, int]

    def encode(self, x: Tensor) -> Tensor:
        """x → its deterministic latent: posterior means, code indices or top features, (B, ...)."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """x → its deterministic reconstruction (B, C, H, W) in [0, 1] (no sampling, no binarisation)."""
        raise NotImplementedError

    def optimizer_groups(self) -> list[dict]:
        """The training loop's optimizer parameter groups (torch.optim form): by default every parameter the
        current phase trains, with the loop's lr, weight decay and betas. A group's "lr_scale" multiplies the
        loop's lr (and its schedule) for that group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


def frozen(module: nn.Module):
    """Context: `module`'s parameters do not require grad inside: a critic's, while the generator's loss or its DDP
    wrapper is built."""
    return _Frozen(module)


class _Frozen:
    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


@runtime_checkable
class Generative(Protocol):
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1] decoded from z ~ p(z)."""
        ...


@runtime_checkable
class Variational(Protocol):
    """q(z|x) = N(mu, diag sigma^2), prior p(z) = N(0, I) and a decoder likelihood p(x|z): what the ELBO and the
    importance-sampled likelihood (`evaluation.likelihood`) need."""

    binarizes: bool  # the likelihood is over dynamically binarised images (x ~ Bernoulli(x)), not grey levels

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x → (mu, logvar) of q(z|x), each (B, D)."""
        ...

    def decoder_nll(self, z: Tensor, x: Tensor) -> Tensor:
        """-log p(x|z) per image (B,), nats, for z (B, D)."""
        ...


@runtime_checkable
class Coded(Protocol):
    codebook_size: int  # K: ModelOutput.codes and encode(x) are indices in 0..K-1


@runtime_checkable
class Supervised(Protocol):
    num_classes: int  # ModelOutput.logits are (B, num_classes)


@runtime_checkable
class Adversarial(Protocol):
    """A family trained against a critic D (`discriminator`), which the training loop steps with its own optimizer
    and its own DDP wrapper after every generator step."""

    discriminator: nn.Module

    def critic_optimizer_groups(self) -> list[dict]:
        """D's optimizer parameter groups, with their lr and betas (the loop uses Adam)."""
        ...

    def critic_active(self, steps: int) -> bool:
        """Is D trained (and the adversarial term on) once `steps` optimizer steps are done?"""
        ...

    def critic_losses(self, x: Tensor, fakes: Tensor, critic: nn.Module) -> ModelOutput:
        """D's loss terms on real x and (detached) generated images, through `critic` (D, or its DDP wrapper)."""
        ...
