"""The one interface every model family implements, so one training loop and one evaluation serve them all."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ModelOutput:
    """What `model(x)` returns.

    recon:   reconstruction of x in image space, values in [0, 1], same shape as x (B, C, H, W); a classifier
             step in training may leave it None.
    losses:  named, already weighted loss terms; the training objective is their sum (`total`).
    metrics: detached per-batch statistics for logging, e.g. ``neg_elbo`` in nats per image.
    codes:   discrete latent indices (B, ...) of families with a codebook (their module has `codebook_size`);
             the training loop and evaluation count them into codebook utilisation and perplexity.
    logits:  class scores (B, classes) of a family with a classifier head.
    fakes:   the generated images a family with a critic wants it to reject this step (reconstructions, and prior
             samples); None: the critic sees `recon`.
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
