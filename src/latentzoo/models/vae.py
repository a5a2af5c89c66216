"""Variational autoencoder, Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114.

Trained by maximising the evidence lower bound (ELBO) per image x,

    log p(x) >= ELBO(x) = E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z)),

with q(z|x) = N(mu(x), diag sigma^2(x)), prior p(z) = N(0, I) and a conv decoder p(x|z). We minimise
-ELBO = recon + KL in nats per image; beta > 1 weights the KL term (beta-VAE, Higgins et al., ICLR 2017).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from latentzoo.models.base import LatentModel, ModelOutput
from latentzoo.models.layers import conv_down, conv_up, feature_shape
from latentzoo.schema import Section


class VAEConfig(Section):
    """params.yaml section `vae`."""

    tune_metric: ClassVar[str] = "val_neg_elbo"  # the tune stage's objective (minimised): -ELBO, whatever beta

    latent_dim: int = Field(16, ge=1)
    hidden_channels: int = Field(32, ge=1)  # width of the first conv; doubles at the second
    levels: int = Field(2, ge=1, le=5)  # stride-2 convs: latent features H/2^levels x W/2^levels (f = 2^levels)
    fc_hidden: int = Field(256, ge=0)  # width of a fully connected layer between conv features and z (0: none)
    beta: float = Field(1.0, ge=0)  # weight of the KL term (beta-VAE, Higgins et al. 2017)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_sigma: float = Field(0.1, gt=0)  # fixed decoder std for the gaussian likelihood
    binarize: bool = True  # dynamic binarisation x ~ Bernoulli(x) (for the bernoulli likelihood)


# ---------------------------------------------------------------- loss terms


def kl_normal_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample, shape (B,), closed form (arXiv 1312.6114, App. B):

    KL = 0.5 * sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-log p(x|z) = -sum_i [x_i log s(l_i) + (1 - x_i) log(1 - s(l_i))], s = sigmoid, per image (B,), nats."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)


def gaussian_nll(mean: Tensor, target: Tensor, sigma: float) -> Tensor:
    """-log N(x; mean, sigma^2 I) per image (B,), in nats:

    sum_i [(x_i - mean_i)^2 / (2 sigma^2) + 0.5 log(2 pi sigma^2)]
    """
    squared = (target - mean).pow(2).flatten(1).sum(dim=1)
    return squared / (2 * sigma**2) + 0.5 * math.log(2 * math.pi * sigma**2) * math.prod(target.shape[1:])


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I): a sample of q(z|x) differentiable in mu and logvar."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


# ---------------------------------------------------------------- model


class GaussianPosterior:
    """What every family with q(z|x) = N(mu, sigma^2) and a Bernoulli/Gaussian decoder shares, given its
    `posterior(x) -> (mu, logvar)`, `decode_logits(z)` and a config with `likelihood` and `gaussian_sigma`."""

    def decode(self, z: Tensor) -> Tensor:
        """z → the mean of p(x|z) in image space [0, 1]."""
        return self._mean(self.decode_logits(z))

    def encode(self, x: Tensor) -> Tensor:
        """The posterior means mu(x), (B, D)."""
        return self.posterior(x)[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction x̂ = E[p(x | z = mu(x))] (no binarisation, no sampling)."""
        return self.decode(self.encode(x))

    def decoder_nll(self, z: Tensor, x: Tensor) -> Tensor:
        """-log p(x|z) per image (B,), nats."""
        return self._nll(self.decode_logits(z), x)

    def _mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.cfg.likelihood == "bernoulli" else logits.clamp(0.0, 1.0)

    def _nll(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_nll(logits, target)
        return gaussian_nll(logits, target, self.cfg.gaussian_sigma)


class VAE(GaussianPosterior, LatentModel):
    """Conv encoder → (mu, logvar) → z → conv decoder → logits of p(x|z).

    Takes (C, H, W) images with H and W divisible by 2^levels (see `layers.feature_shape`).
    """

    def __init__(self, cfg: VAEConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        features = feature_shape(self.image_shape, cfg.hidden_channels, cfg.levels, family="vae")
        flat = math.prod(features)
        width = cfg.fc_hidden or flat
        fc_in = [nn.Linear(flat, width), nn.SiLU()] if cfg.fc_hidden else []
        fc_out = [nn.Linear(width, flat), nn.SiLU()] if cfg.fc_hidden else []
        self.encoder = nn.Sequential(
            conv_down(self.image_shape[0], cfg.hidden_channels, cfg.levels),
            nn.Flatten(),
            *fc_in,
            nn.Linear(width, 2 * cfg.latent_dim),  # mu and logvar side by side
        )
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, width),
            nn.SiLU(),
            *fc_out,
            nn.Unflatten(1, features),
            conv_up(cfg.hidden_channels, self.image_shape[0], cfg.levels),
        )

    @property
    def binarizes(self) -> bool:
        return self.cfg.binarize and self.cfg.likelihood == "bernoulli"

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) → (mu, logvar) of q(z|x), each (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) → decoder output (B, C, H, W): Bernoulli logits, or the Gaussian mean."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, *, step=None, labels=None) -> ModelOutput:
        """One-sample estimate of -ELBO = recon + KL per image; `generator` seeds binarisation and eps (`step`
        and `labels`: the common interface, unused)."""
        if self.binarizes:
            x = torch.bernoulli(x, generator=generator)  # dynamic binarisation; encoder and target see the same x
        mu, logvar = self.posterior(x)
        logits = self.decode_logits(reparameterize(mu, logvar, generator))
        recon, kl = self._nll(logits, x), kl_normal_standard(mu, logvar)
        return ModelOutput(
            recon=self._mean(logits),
            losses={"recon": recon.mean(), "kl": self.cfg.beta * kl.mean()},
            metrics={
                "neg_elbo": (recon + kl).mean().detach(),  # unweighted by beta: a bound on -log p(x)
                "kl": kl.mean().detach(),
                "recon_nats": recon.mean().detach(),
            },
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]: the decoder mean of z ~ N(0, I)."""
        ref = next(self.parameters())
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.decode(z)
