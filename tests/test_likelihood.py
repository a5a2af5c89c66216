"""The importance-sampled NLL against a model whose marginal likelihood is known in closed form.

Linear Gaussian decoder: p(z) = N(0, I_d), p(x|z) = N(Wz + b, s^2 I_n), so p(x) = N(b, W W^T + s^2 I_n) and the exact
posterior is p(z|x) = N(A W^T (x - b) / s^2, A), A = (I + W^T W / s^2)^-1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from latentzoo.evaluation.likelihood import importance_sampled_nll, log_weights
from latentzoo.models.base import Variational


class LinearGaussian:
    """A Variational family with a known p(x): q(z|x) is the exact posterior (when A is diagonal, see
    `orthogonal_model`), or (exact=False) a broader guess."""

    binarizes = False

    def __init__(self, n: int = 6, d: int = 2, s: float = 0.5, exact: bool = True, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W, self.b, self.s, self.exact = torch.randn(n, d, generator=g), torch.randn(n, generator=g), s, exact
        self.A = torch.linalg.inv(torch.eye(d) + self.W.T @ self.W / s**2)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = (x - self.b) @ self.W @ self.A.T / self.s**2
        widen = 1.0 if self.exact else 4.0  # a guess twice as wide: a loose bound that k must tighten
        return mu, torch.log(widen * torch.diagonal(self.A)).expand_as(mu)

    def decoder_nll(self, z: Tensor, x: Tensor) -> Tensor:
        mean = z @ self.W.T + self.b
        n = x.shape[1]
        return ((x - mean).pow(2).sum(1) / (2 * self.s**2)) + 0.5 * n * math.log(2 * math.pi * self.s**2)

    def true_nll(self, x: Tensor) -> Tensor:
        cov = (self.W @ self.W.T + self.s**2 * torch.eye(len(self.b))).double()
        dist = torch.distributions.MultivariateNormal(self.b.double(), covariance_matrix=cov)
        return -dist.log_prob(x.double())


def orthogonal_model(exact: bool) -> LinearGaussian:
    """W with orthogonal columns: W^T W is diagonal, so the exact posterior covariance A is diagonal too."""
    model = LinearGaussian(exact=exact)
    q, _ = torch.linalg.qr(model.W)
    model.W = q * torch.tensor([2.0, 0.7])
    model.A = torch.linalg.inv(torch.eye(2) + model.W.T @ model.W / model.s**2)
    return model


def data(model: LinearGaussian, count: int = 64) -> Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(count, model.W.shape[1], generator=g)
    return z @ model.W.T + model.b + model.s * torch.randn(count, len(model.b), generator=g)


def test_the_test_model_has_the_interface_evaluation_asks_for():
    assert isinstance(LinearGaussian(), Variational)


def test_with_the_exact_posterior_every_weight_is_p_of_x():
    model = orthogonal_model(exact=True)
    x = data(model)
    nll = importance_sampled_nll(model, x, k=5, generator=torch.Generator().manual_seed(0))
    assert nll.dtype == torch.float64 and nll.shape == (64,)
    torch.testing.assert_close(nll, model.true_nll(x), rtol=0, atol=1e-4)  # log w = log p(x) for every z


def test_with_a_loose_posterior_the_bound_tightens_with_k_towards_the_true_nll():
    model = orthogonal_model(exact=False)
    x = data(model)
    true = model.true_nll(x).mean().item()
    bounds = {
        k: importance_sampled_nll(model, x, k, torch.Generator().manual_seed(k)).mean().item() for k in (1, 10, 1000)
    }
    assert bounds[1] > bounds[10] > bounds[1000] >= true - 0.01  # an upper bound, tighter with more samples
    assert bounds[1] - true > 0.3 and bounds[1000] - true < 0.02


def test_k_one_is_the_elbo_and_chunks_do_not_change_the_estimate(monkeypatch):
    model = orthogonal_model(exact=False)
    x = data(model, 8)
    weights = log_weights(model, x, 50, torch.Generator().manual_seed(3))
    monkeypatch.setattr("latentzoo.evaluation.likelihood.ROWS_PER_CHUNK", 8)  # one sample per chunk
    chunked = log_weights(model, x, 50, torch.Generator().manual_seed(3))
    torch.testing.assert_close(weights, chunked)
    assert weights.shape == (50, 8)
    neg_elbo = -weights.mean(0)  # E_q[-log w]
    nll = -(torch.logsumexp(weights, 0) - math.log(50))
    assert torch.all(nll <= neg_elbo)  # Jensen


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k >= 1"):
        importance_sampled_nll(LinearGaussian(), torch.zeros(2, 6), k=0)
