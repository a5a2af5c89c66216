"""VAE (arXiv 1312.6114): shapes, loss terms against torch.distributions, training signal, determinism."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from latentzoo.errors import ConfigError
from latentzoo.models import REGISTRY, build_model
from latentzoo.models.vae import VAE, VAEConfig, bernoulli_nll, gaussian_nll, kl_normal_standard

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def images(shape, n=4, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes(shape, likelihood):
    model = VAE(VAEConfig(latent_dim=5, hidden_channels=8, likelihood=likelihood), shape)
    x = images(shape)
    out = model(x)
    assert out.recon.shape == x.shape
    assert 0 <= out.recon.min() and out.recon.max() <= 1
    assert set(out.losses) == {"recon", "kl"} and set(out.metrics) == {"neg_elbo", "kl", "recon_nats"}
    assert all(v.ndim == 0 for v in [*out.losses.values(), *out.metrics.values()])
    mu, logvar = model.posterior(x)
    assert mu.shape == logvar.shape == (4, 5)
    assert model.decode_logits(mu).shape == x.shape


@pytest.mark.parametrize("shape", [(1, 10, 10), (3, 32, 30), (1, 2, 2)])
def test_bad_shape_raises_config_error(shape):
    with pytest.raises(ConfigError, match=r"divisible by 4.*image shape"):
        VAE(VAEConfig(), shape)


def test_registry_builds_vae():
    assert REGISTRY["vae"].config_cls is VAEConfig and REGISTRY["vae"].model_cls is VAE
    assert isinstance(build_model("vae", VAEConfig(latent_dim=3), (1, 8, 8)), VAE)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("nope", VAEConfig(), (1, 8, 8))


def test_gradients_reach_every_parameter():
    model = VAE(VAEConfig(latent_dim=4, hidden_channels=4), (1, 8, 8))
    model(images((1, 8, 8))).total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_normal_standard(mu, logvar), expected)
    assert torch.allclose(kl_normal_standard(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_recon_terms_match_torch_distributions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = torch.bernoulli(torch.rand(3, 1, 8, 8, generator=g), generator=g)
    expected = -Bernoulli(logits=logits).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, target), expected)
    mean, x = torch.rand(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    expected = -Normal(mean, 0.1).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_nll(mean, x, 0.1), expected)


def test_binarized_target_is_what_forward_scores():
    """With binarisation the recon metric is the Bernoulli NLL of x_bin ~ Bernoulli(x) drawn from the generator."""
    model = VAE(VAEConfig(latent_dim=3, hidden_channels=4), (1, 8, 8)).eval()
    x = images((1, 8, 8))
    out = model(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x_bin = torch.bernoulli(x, generator=g)
    mu, logvar = model.posterior(x_bin)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
    torch.testing.assert_close(out.metrics["recon_nats"], bernoulli_nll(model.decode_logits(z), x_bin).mean())


def test_loss_falls_when_overfitting_a_tiny_batch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead, badly so on a busy machine
    try:
        losses = overfit(steps=50)
    finally:
        torch.set_num_threads(threads)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def overfit(steps: int) -> list[float]:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_channels=16, binarize=False), (1, 8, 8))
    x = (images((1, 8, 8), n=8) > 0.5).float()  # binary, so the reconstruction term can approach 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        out = model(x, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    return losses


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_sample_shape_and_range(likelihood):
    model = VAE(VAEConfig(latent_dim=3, hidden_channels=4, likelihood=likelihood), (3, 32, 32))
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 3, 32, 32) and not s.requires_grad
    assert 0 <= s.min() and s.max() <= 1
    torch.testing.assert_close(s, model.sample(5, generator=torch.Generator().manual_seed(0)))


def test_same_generator_same_output_in_eval():
    model = VAE(VAEConfig(latent_dim=3, hidden_channels=4), (1, 28, 28)).eval()
    x = images((1, 28, 28))
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    c = model(x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.recon, b.recon)
    assert all(torch.equal(a.metrics[k], b.metrics[k]) for k in a.metrics)
    assert not torch.equal(a.metrics["recon_nats"], c.metrics["recon_nats"])


def test_beta_scales_kl_loss_not_metric():
    x = images((1, 8, 8))
    outs = {}
    for beta in (1.0, 4.0, 0.0):
        torch.manual_seed(0)  # same initial weights for every beta
        model = VAE(VAEConfig(latent_dim=3, hidden_channels=4, beta=beta), (1, 8, 8))
        outs[beta] = model(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outs[4.0].losses["kl"], 4.0 * outs[1.0].losses["kl"])
    assert outs[0.0].losses["kl"] == 0
    for beta in (4.0, 0.0):
        torch.testing.assert_close(outs[beta].metrics["kl"], outs[1.0].metrics["kl"])
        torch.testing.assert_close(outs[beta].metrics["neg_elbo"], outs[1.0].metrics["neg_elbo"])
    m = outs[1.0].metrics
    torch.testing.assert_close(m["neg_elbo"], m["recon_nats"] + m["kl"])


def test_config_is_strict():
    with pytest.raises(ValueError):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError):
        VAEConfig(likelihood="laplace")
    with pytest.raises(ValueError):
        VAEConfig(latent_dims=3)
