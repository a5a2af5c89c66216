"""Residual VAE with a mixture-of-Gaussians aggregate posterior and a PatchGAN critic, after M. Rivera,
"How to Train Your VAE", arXiv 2309.13160.

Encoder and decoder are ResNetV2 pre-activation stacks (`models.resnet`) around a (c, H/2^L, W/2^L) feature map;
the latent z is that map itself (`latent_dim: 0`) or a dense vector in R^latent_dim, linear from and to the map,
with q(z|x) = N(mu(x), diag sigma^2(x)) and z = mu + sigma * eps. Instead of pulling every sample's posterior to
N(0, I), the paper regularises the *aggregate* posterior q(z) = (1/N) sum_i N(mu_i, sigma_i^2), a mixture of the
batch's Gaussians: its mean and covariance,

    m = mean_i mu_i,    S = Cov_i(mu_i) + diag(mean_i sigma_i^2),

are pulled to those of N(0, I), so that samples of the prior land where the decoder was trained:

    L_agg = KL(N(m, S) || N(0, I)) = 0.5 * (tr S + m^T m - D - log det S)          (moments: "full")
    L_agg = 0.5 * sum_d (m_d^2 + S_dd - 1 - log S_dd)                                  (moments: "diagonal").

A per-sample term keeps every sigma away from collapse (no mu^2 term: the means stay free to spread out),

    L_var = -sum_d (1 + log sigma_d^2 - sigma_d^2)   (>= 0, smallest at sigma = 1; its gradient pushes a small
                                                       sigma up),

    loss = E[-log p(x|z)] + w_agg * L_agg + lambda * L_var (+ w_adv * lambda_adapt * L_G)      ("mixture")
    loss = E[-log p(x|z)] + w_kl * KL(q(z|x) || N(0, I))   (+ the same adversarial term)          ("standard").

Under DDP, m and S are over the *global* batch: the per-rank sums of mu, mu mu^T and sigma^2 are all-reduced with
a differentiable all-reduce, so each rank's gradient is that of the global statistic (`batch_covariance`).

The adversarial term (`models.patchgan`) starts after `disc_start` optimizer steps (the training loop passes the
step in); the discriminator is trained by the loop with its own optimizer and DDP wrapper (`models.base.Adversarial`),
the generator's step never builds a graph into it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from latentzoo.ddp import is_distributed
from latentzoo.errors import ConfigError
from latentzoo.models.base import LatentModel, ModelOutput, frozen
from latentzoo.models.patchgan import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from latentzoo.models.resnet import decoder, encoder
from latentzoo.models.vae import GaussianPosterior, kl_normal_standard, reparameterize
from latentzoo.schema import Section

COLLAPSED_SIGMA = 0.01  # a latent dim whose mean posterior std is below this has collapsed to a point


class ResVAEGANConfig(Section):
    """params.yaml section `resvae_gan`."""

    tune_metric: ClassVar[str] = "val_neg_elbo"  # the tune stage's objective (minimised)

    width: int = Field(32, ge=1)  # channels of the first level; doubles at each downsampling
    levels: int = Field(2, ge=1, le=5)  # strided blocks: the latent map is H/2^levels x W/2^levels
    blocks: int = Field(1, ge=0)  # identity blocks per level (depth)
    latent_channels: int = Field(4, ge=1)
    latent_dim: int = Field(16, ge=0)  # > 0: a dense z in R^latent_dim, linear from/to the map; 0: z is the map
    posterior: Literal["mixture", "standard"] = "mixture"
    moments: Literal["diagonal", "full"] = "full"  # mixture: match per-dim variances, or the whole covariance
    aggregate_weight: float = Field(1.0, ge=0)  # w_agg: KL of the batch mixture's moments to N(0, 1)
    variance_weight: float = Field(0.5, ge=0)  # lambda: 0.5 is the sigma part of the standard KL
    kl_weight: float = Field(1.0, ge=0)  # w_kl, for posterior: standard
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_sigma: float = Field(0.1, gt=0)
    gan_loss: Literal["hinge", "bce"] = "hinge"
    adversarial_weight: float = Field(0.1, ge=0)  # w_adv (0: no discriminator is trained)
    adaptive_weight: bool = True  # scale L_G by lambda_adapt = |grad L_rec| / |grad L_G| at the last layer
    adversarial_samples: bool = True  # the critic also judges decoded prior samples z ~ N(0, I) (as VAE-GAN)
    disc_start: int = Field(200, ge=0)  # optimizer steps before the adversarial term and D's training start
    disc_width: int = Field(32, ge=1)
    disc_layers: int = Field(2, ge=1, le=5)
    disc_lr: float = Field(2e-4, gt=0)
    adam_beta1: float = Field(0.5, ge=0, lt=1)  # both optimizers (Adam, beta1 = 0.5 as for GANs)
    adam_beta2: float = Field(0.9, ge=0, lt=1)


def batch_moments(mu: Tensor, logvar: Tensor, global_batch: bool) -> tuple[Tensor, Tensor]:
    """Mean m and variance v, per dim, of the batch's mixture (1/N) sum_i N(mu_i, sigma_i^2):

        m = mean_i mu_i,    v = mean_i (mu_i^2 + sigma_i^2) - m^2  = Var_i(mu_i) + mean_i sigma_i^2.

    With `global_batch` and a process group, over every rank's batch: the sums are all-reduced by
    `torch.distributed.nn.all_reduce`, whose backward all-reduces the gradients, so the gradient is that of the
    global statistic."""
    stats = torch.cat([mu.sum(0), (mu.pow(2) + logvar.exp()).sum(0), mu.new_tensor([len(mu)])])
    if global_batch and is_distributed():
        from torch.distributed.nn.functional import all_reduce

        stats = all_reduce(stats)
    d = mu.shape[1]
    count = stats[-1]
    mean = stats[:d] / count
    var = (stats[d : 2 * d] / count - mean.pow(2)).clamp_min(1e-6)
    return mean, var


def aggregate_kl(mean: Tensor, var: Tensor) -> Tensor:
    """KL(N(m, v) || N(0, 1)) summed over dims: 0.5 * sum_d (m_d^2 + v_d - 1 - log v_d)."""
    return 0.5 * (mean.pow(2) + var - 1.0 - var.log()).sum()


def batch_covariance(mu: Tensor, logvar: Tensor, global_batch: bool) -> tuple[Tensor, Tensor]:
    """Mean m and covariance S of the batch's mixture, (D,) and (D, D):

        m = mean_i mu_i,    S = mean_i (mu_i mu_i^T + diag sigma_i^2) - m m^T  = Cov_i(mu_i) + diag(mean_i sigma_i^2),

    over every rank's batch with `global_batch` (differentiable all-reduce, as in `batch_moments`)."""
    d = mu.shape[1]
    second = mu.T @ mu + torch.diag(logvar.exp().sum(0))
    stats = torch.cat([mu.sum(0), second.flatten(), mu.new_tensor([len(mu)])])
    if global_batch and is_distributed():
        from torch.distributed.nn.functional import all_reduce

        stats = all_reduce(stats)
    count = stats[-1]
    mean = stats[:d] / count
    cov = stats[d : d + d * d].view(d, d) / count - torch.outer(mean, mean)
    return mean, cov + 1e-6 * torch.eye(d, device=mu.device, dtype=mu.dtype)


def aggregate_kl_full(mean: Tensor, cov: Tensor) -> Tensor:
    """KL(N(m, S) || N(0, I)) = 0.5 * (tr S + m^T m - D - log det S): also pulls the dims' correlations to 0, so
    that the mixture fills the prior's ball rather than a thin slab of it."""
    return 0.5 * (torch.trace(cov) + mean.pow(2).sum() - len(mean) - torch.logdet(cov))


def aggregate_loss(mu: Tensor, logvar: Tensor, moments: str, global_batch: bool) -> Tensor:
    """L_agg: the KL to N(0, I) of the batch mixture's per-dim moments ("diagonal") or of its mean and whole
    covariance ("full")."""
    if moments == "full":
        return aggregate_kl_full(*batch_covariance(mu, logvar, global_batch))
    return aggregate_kl(*batch_moments(mu, logvar, global_batch))


def variance_penalty(logvar: Tensor) -> Tensor:
    """-sum_d (1 + log sigma_d^2 - sigma_d^2) per sample, (B,): zero at sigma = 1, large as sigma -> 0."""
    return -(1.0 + logvar - logvar.exp()).sum(dim=1)


class ResVAEGAN(GaussianPosterior, LatentModel):
    """Residual VAE generator + PatchGAN `discriminator` (the training loop gives D its own optimizer and DDP)."""

    def __init__(self, cfg: ResVAEGANConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        scale = 2**cfg.levels
        if h % scale or w % scale:
            raise ConfigError(
                f"resvae_gan.levels {cfg.levels} needs height and width divisible by {scale}, got "
                f"image shape {self.image_shape}; lower resvae_gan.levels or resize (data.image_size)"
            )
        self.map_shape = (cfg.latent_channels, h // scale, w // scale)
        self.encoder = encoder(c, cfg.width, cfg.levels, cfg.blocks, 2 * cfg.latent_channels)
        self.decoder = decoder(cfg.latent_channels, cfg.width, cfg.levels, cfg.blocks, c)
        flat = cfg.latent_channels * (h // scale) * (w // scale)
        self.latent_shape = (cfg.latent_dim,) if cfg.latent_dim else self.map_shape
        self.to_latent = nn.Linear(2 * flat, 2 * cfg.latent_dim) if cfg.latent_dim else nn.Identity()
        self.from_latent = nn.Linear(cfg.latent_dim, flat) if cfg.latent_dim else nn.Identity()
        self.discriminator = PatchDiscriminator(c, cfg.disc_width, cfg.disc_layers)
        # optimizer steps trained (the loop's count, kept with the weights): evaluation scores as at the end
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("gan_lambda", torch.ones(()))  # the last adaptive weight (used in evaluation)

    # ------------------------------------------------------------ the optimizers and the critic (base.Adversarial)

    def optimizer_groups(self) -> list[dict]:
        """The generator's parameters (D's excepted), with the GAN betas."""
        critic = {id(p) for p in self.discriminator.parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in critic]
        return [{"params": params, "betas": (self.cfg.adam_beta1, self.cfg.adam_beta2)}]

    def critic_optimizer_groups(self) -> list[dict]:
        betas = (self.cfg.adam_beta1, self.cfg.adam_beta2)
        return [{"params": list(self.discriminator.parameters()), "lr": self.cfg.disc_lr, "betas": betas}]

    def critic_active(self, steps: int) -> bool:
        """The adversarial term and D's training are on once `disc_start` optimizer steps are done."""
        return self.cfg.adversarial_weight > 0 and steps >= self.cfg.disc_start

    def critic_losses(self, x: Tensor, fakes: Tensor, critic: nn.Module) -> ModelOutput:
        """L_D on real images x and (detached) generated ones (reconstructions, and prior samples), one forward
        of `critic` (the DDP-wrapped D in training) over both."""
        logits = critic(torch.cat([x, fakes.detach()]))
        real, fake = logits[: len(x)], logits[len(x) :]
        return ModelOutput(
            None,
            {"gan": discriminator_loss(real, fake, self.cfg.gan_loss)},
            {"logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()},
        )

    # ------------------------------------------------------------ the VAE

    @property
    def binarizes(self) -> bool:
        return False  # continuous targets: the critic sharpens grey levels, not coin flips

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) → (mu, logvar) of q(z|x), each flattened to (B, D), D = prod(latent_shape)."""
        h = self.encoder(x)
        if self.cfg.latent_dim:
            h = self.to_latent(h.flatten(1))
        mu, logvar = h.chunk(2, dim=1)
        return mu.flatten(1), logvar.flatten(1).clamp(-30.0, 20.0)

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(self.from_latent(z.flatten(1)).view(len(z), *self.map_shape))

    def forward(self, x: Tensor, generator: torch.Generator | None = None, *, step=None, labels=None) -> ModelOutput:
        """The generator's loss terms (recon, the posterior's regularisers, adversarial) and latent-health metrics.
        `step`: optimizer steps before this batch (None: the steps trained); `labels`: unused."""
        step = int(self.step) if step is None else step
        adversarial = self.critic_active(step)
        mu, logvar = self.posterior(x)
        logits = self.decode_logits(reparameterize(mu, logvar, generator))
        nll, kl = self._nll(logits, x), kl_normal_standard(mu, logvar)
        losses = {"recon": nll.mean()}
        if self.cfg.posterior == "standard":
            losses["kl"] = self.cfg.kl_weight * kl.mean()
        else:
            losses["aggregate"] = self.cfg.aggregate_weight * aggregate_loss(
                mu, logvar, self.cfg.moments, global_batch=self.training
            )
            losses["variance"] = self.cfg.variance_weight * variance_penalty(logvar).mean()
        recon = self._mean(logits)
        fakes = recon
        if adversarial and self.cfg.adversarial_samples:  # decoded z ~ N(0, I): what sample() makes
            fakes = torch.cat([recon, self._mean(self.decode_logits(torch.randn_like(mu)))])
        losses["adversarial"] = self._adversarial(fakes, losses["recon"]) if adversarial else recon.new_zeros(())
        if self.training and torch.is_grad_enabled():
            self.step.fill_(step + 1)
        sigma = (0.5 * logvar).exp().detach()
        return ModelOutput(
            recon=recon,
            fakes=fakes,
            losses=losses,
            metrics={
                "neg_elbo": (nll + kl).mean().detach(),  # the ELBO of this encoder/decoder, whatever the objective
                "kl": kl.mean().detach(),
                "recon_nats": nll.mean().detach(),
                "mean_sigma": sigma.mean(),
                "collapsed_dims": (sigma.mean(0) < COLLAPSED_SIGMA).sum().float(),
            },
        )

    def _adversarial(self, fakes: Tensor, rec_loss: Tensor) -> Tensor:
        """w_adv * lambda_adapt * L_G(D(fakes)); D's weights get no gradient from it."""
        with frozen(self.discriminator):
            gan = generator_loss(self.discriminator(fakes), self.cfg.gan_loss)
        if self.cfg.adaptive_weight and self.training and torch.is_grad_enabled():
            self.gan_lambda.copy_(adaptive_weight(rec_loss, gan, self.decoder[-1].weight))
        weight = self.gan_lambda if self.cfg.adaptive_weight else 1.0
        return self.cfg.adversarial_weight * weight * gan

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]: the decoder mean of z ~ N(0, I)."""
        ref = next(self.parameters())
        z = torch.randn(n, *self.latent_shape, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.decode(z.flatten(1))
