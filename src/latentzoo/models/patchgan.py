"""PatchGAN discriminator and the adversarial losses (Isola et al., "Image-to-Image Translation with Conditional
Adversarial Networks", arXiv 1611.07004; adaptive weight from Esser et al., VQGAN, arXiv 2012.09841).

The discriminator D maps an image to a grid of logits, one per overlapping patch, so it judges local texture
rather than the whole image. Losses, with logits averaged over patches and the batch:

    hinge:  L_D = E[relu(1 - D(x))] + E[relu(1 + D(x̂))],          L_G = -E[D(x̂)]
    bce:    L_D = E[softplus(-D(x))] + E[softplus(D(x̂))],          L_G = E[softplus(-D(x̂))]

Adaptive weight (VQGAN eq. 7), at the decoder's last layer G_L:

    λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_G‖ + δ),  clamped to [0, 10^4]

so the adversarial gradient reaching the decoder is as large as the reconstruction gradient, whatever the scales.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from latentzoo.ddp import is_distributed
from latentzoo.models.resnet import norm

GanLoss = Literal["hinge", "bce"]


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convs (width doubling) with LeakyReLU(0.2), then a stride-1 4x4 conv to 1 logit per
    patch: an (C, H, W) image gives an (1, H/2^layers, W/2^layers) grid of logits (at least 1x1)."""

    def __init__(self, in_channels: int, width: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), norm(2 * channels), nn.LeakyReLU(0.2)]
            channels *= 2
        blocks.append(nn.Conv2d(channels, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] → (B, 1, h, w) patch logits (inputs centred to [-1, 1] first)."""
        return self.net(2 * x - 1)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLoss) -> Tensor:
    """L_D: low when D scores real patches high and generated ones low."""
    if kind == "hinge":
        return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_loss(logits_fake: Tensor, kind: GanLoss) -> Tensor:
    """L_G: low when D scores the generated patches as real."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, delta: float = 1e-4) -> Tensor:
    """λ = ‖∇_w L_rec‖ / (‖∇_w L_G‖ + δ) at the weight `last_layer`, clamped to [0, 1e4], detached.

    Under DDP the per-rank λ are averaged (one all-reduce), so every rank weighs the adversarial term alike.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = (rec_grad.norm() / (gan_grad.norm() + delta)).clamp(0.0, 1e4).detach()
    if is_distributed():
        dist.all_reduce(weight)
        weight /= dist.get_world_size()
    return weight
