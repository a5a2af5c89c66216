"""Importance-sampled negative log-likelihood, the figure VAE papers print (Burda et al., IWAE, arXiv 1509.00519).

For a family with a Gaussian posterior q(z|x), prior p(z) = N(0, I) and decoder p(x|z), with z_1..z_k ~ q(z|x),

    log w_j = log p(x|z_j) + log p(z_j) - log q(z_j|x),
    -log p(x) <= NLL_k(x) = -(logsumexp_j log w_j - log k)  <=  -ELBO(x) = -E_q[log w],

a bound that tightens as k grows (k = 1 is the ELBO; Burda et al. use k = 5000, pythae 200). The samples are
drawn in chunks and the log-sum-exp is taken in float64: with 784 pixels, log w is around -100 nats and its
spread over samples is what the estimate is made of.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentzoo.models import Variational

LOG_2PI = math.log(2 * math.pi)
ROWS_PER_CHUNK = 4096  # decoder inputs per forward pass (samples x images)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row of z (..., D), summed over D."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) per row, summed over D."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI).sum(dim=-1)


@torch.no_grad()
def log_weights(model: Variational, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """log w (k, B) in float64 for x (B, ...), z_j = mu + sigma * eps_j drawn from q(z|x) in chunks."""
    mu, logvar = model.posterior(x)
    chunk = max(1, ROWS_PER_CHUNK // len(x))
    found = []
    for start in range(0, k, chunk):
        s = min(chunk, k - start)
        eps = torch.randn((s, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps  # (s, B, D)
        images = x.unsqueeze(0).expand(s, *x.shape).reshape(s * len(x), *x.shape[1:])
        log_px = -model.decoder_nll(z.reshape(s * len(x), -1), images).view(s, len(x))
        z, mu64, logvar64 = z.double(), mu.double(), logvar.double()
        found.append(log_px.double() + log_standard_normal(z) - log_normal(z, mu64, logvar64))
    return torch.cat(found)


def importance_sampled_nll(model: Variational, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """NLL_k(x) per image (B,), float64 nats: -(logsumexp_j log w_j - log k) over k samples of q(z|x)."""
    if k < 1:
        raise ValueError(f"importance sampling needs k >= 1 samples, got {k}")
    return -(torch.logsumexp(log_weights(model, x, k, generator), dim=0) - math.log(k))
