"""VQ-VAE (van den Oord et al., arXiv 1711.00937) and SimVQ (Zhu et al., arXiv 2411.02038) autoencoders.

Both are the same conv autoencoder around a quantizer (see `latentzoo.models.quantizer`):

    z_e = E(x) in R^{D x H/f x W/f},   z_q = nearest code of each z_e vector,   x̂ = sigmoid(G(z_q)),

trained on  L = ||x - x̂||^2 + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2  (the codebook term is dropped for an
EMA codebook). They differ only in the codebook: a learned (or EMA) table for `vqvae`, e = C W^T with a frozen
random C for `simvq`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from latentzoo.models.base import LatentModel, ModelOutput
from latentzoo.models.layers import conv_down, conv_up, feature_shape
from latentzoo.models.quantizer import Quantizer, SimVQ, VectorQuantizer
from latentzoo.schema import Section


class _VQSection(Section):
    tune_metric: ClassVar[str] = "val_mse"  # the tune stage's objective (minimised): reconstruction error
    hidden_channels: int = Field(32, ge=1)  # width of the first conv; doubles at the second
    levels: int = Field(2, ge=1, le=5)  # stride-2 convs: one code per 2^levels x 2^levels patch
    codebook_dim: int = Field(32, ge=1)  # D: channels of z_e and length of every code
    codebook_size: int = Field(512, ge=1)  # K
    commitment_weight: float = Field(0.25, ge=0)  # beta
    chunk_size: int = Field(1024, ge=1)  # codes per block of the nearest-code search (benchmarks/vq_speed.py)
    rotation_trick: bool = False  # decoder gradient to z_e by the rotation onto its code, not straight-through
    codebook_lr_scale: float = Field(1.0, gt=0)  # the codebook's (SimVQ: W's) learning rate over train.lr


class VQVAEConfig(_VQSection):
    """params.yaml section `vqvae`."""

    ema: bool = False  # codebook as exponential moving averages of its assigned z_e (App. A.1)
    decay: float = Field(0.99, gt=0, lt=1)  # EMA decay
    restart_after: int = Field(0, ge=0)  # re-seed codes unused for this many steps from encoder outputs (0: off)
    kmeans_init: bool = False  # codebook = k-means centroids of the first training batch
    kmeans_iters: int = Field(10, ge=1)

    def build_quantizer(self) -> Quantizer:
        return VectorQuantizer(
            self.codebook_size,
            self.codebook_dim,
            self.commitment_weight,
            ema=self.ema,
            decay=self.decay,
            restart_after=self.restart_after,
            kmeans_init=self.kmeans_init,
            kmeans_iters=self.kmeans_iters,
            chunk_size=self.chunk_size,
            rotation_trick=self.rotation_trick,
        )


class SimVQConfig(_VQSection):
    """params.yaml section `simvq`. By default the rotation trick with W at 5x the lr: it fills a large codebook on
    MNIST (8,192 codes, one epoch of 60k images, one seed: 26% of the codes used with neither, 39% with W's lr
    alone, 52% with the rotation alone, 86% with both, at a better PSNR), but only at a small commitment weight.
    On the bundled digits (512 codes, 30 epochs) it uses 72-78% of the codes at beta 0.05-0.25 and 73% at 0.4
    (20-47% without, at a higher MSE), 35% at 0.5 and 4% at 0.7: the tune stage searches beta up to 0.4."""

    rotation_trick: bool = True
    codebook_lr_scale: float = Field(5.0, gt=0)
    bias: bool = False  # e = C W^T + b: the official code's nn.Linear keeps its bias

    def build_quantizer(self) -> Quantizer:
        return SimVQ(
            self.codebook_size,
            self.codebook_dim,
            self.commitment_weight,
            chunk_size=self.chunk_size,
            rotation_trick=self.rotation_trick,
            bias=self.bias,
        )


class VQVAE(LatentModel):
    """Conv encoder → 1x1 conv to D channels → quantizer → 3x3 conv → conv decoder → sigmoid.

    Takes (C, H, W) images with H and W divisible by f = 2^levels: one code per f x f patch (7x7 codes for
    MNIST at the default f = 4).
    """

    def __init__(self, cfg: VQVAEConfig | SimVQConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        family = "simvq" if isinstance(cfg, SimVQConfig) else "vqvae"
        features = feature_shape(self.image_shape, cfg.hidden_channels, cfg.levels, family)
        self.encoder = nn.Sequential(
            conv_down(self.image_shape[0], cfg.hidden_channels, cfg.levels),
            nn.Conv2d(features[0], cfg.codebook_dim, kernel_size=1),
        )
        self.quantizer = cfg.build_quantizer()
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.codebook_dim, features[0], kernel_size=3, padding=1),
            nn.SiLU(),
            conv_up(cfg.hidden_channels, self.image_shape[0], cfg.levels),
        )

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def optimizer_groups(self) -> list[dict]:
        """The autoencoder at the loop's lr; the quantizer's parameters (the codebook, or SimVQ's W) at
        `codebook_lr_scale` times it."""
        codebook = [p for p in self.quantizer.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if p.requires_grad and all(p is not q for q in codebook)]
        groups = [{"params": rest}, {"params": codebook, "lr_scale": self.cfg.codebook_lr_scale}]
        return [g for g in groups if g["params"]]  # an EMA codebook has no parameters

    def encode(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) → code indices (B, H/f, W/f)."""
        return self.quantizer(self.encoder(x))[1]

    def reconstruct(self, x: Tensor) -> Tensor:
        """x̂ = sigmoid(G(z_q)): the decoded nearest codes of x (the model is deterministic)."""
        return self.decode(self.encode(x))

    def decode(self, codes: Tensor) -> Tensor:
        """Code indices (B, h, w) → images (B, C, H, W) in [0, 1]."""
        z_q = self.quantizer.lookup(codes.flatten()).reshape(*codes.shape, -1).permute(0, 3, 1, 2)
        return torch.sigmoid(self.decoder(z_q))

    def forward(self, x: Tensor, generator: torch.Generator | None = None, *, step=None, labels=None) -> ModelOutput:
        """Deterministic; `generator`, `step` and `labels` are the common interface, unused."""
        z_q, codes, vq_losses = self.quantizer(self.encoder(x))
        recon = torch.sigmoid(self.decoder(z_q))
        mse = F.mse_loss(recon, x)
        return ModelOutput(
            recon=recon,
            losses={"recon": mse, **vq_losses},
            metrics={"mse": mse.detach()},
            codes=codes,
        )
