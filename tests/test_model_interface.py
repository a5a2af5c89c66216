"""The interface every family shares (models.base.LatentModel) and the capabilities each declares."""

from __future__ import annotations

import pytest
import torch
from conftest import make_params

from latentzoo.models import REGISTRY, build_model
from latentzoo.models.base import Adversarial, Coded, Generative, LatentModel, Supervised, Variational

TINY = {
    "vae.latent_dim": 4,
    "vae.hidden_channels": 4,
    "vae.fc_hidden": 16,
    "vqvae.hidden_channels": 4,
    "vqvae.codebook_dim": 4,
    "vqvae.codebook_size": 16,
    "simvq.hidden_channels": 4,
    "simvq.codebook_dim": 4,
    "simvq.codebook_size": 16,
    "resvae_gan.width": 4,
    "resvae_gan.blocks": 0,
    "resvae_gan.latent_channels": 2,
    "resvae_gan.disc_width": 4,
    "resvae_gan.disc_start": 5,
    "stacked_ae.layers": [16, 8],
}
CAPABILITIES = {
    "vae": {Generative, Variational},
    "vqvae": {Coded},
    "simvq": {Coded},
    "resvae_gan": {Generative, Variational, Adversarial},
    "stacked_ae": {Supervised},
}


def model(name: str) -> LatentModel:
    torch.manual_seed(0)
    return build_model(name, make_params(**TINY).model_config_for(name), (1, 8, 8))


def test_every_family_has_a_declared_capability_set():
    assert set(CAPABILITIES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_one_interface_and_the_declared_capabilities(name):
    m = model(name).eval()
    x, labels = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert isinstance(m, LatentModel)
    declared = {c for c in (Generative, Variational, Coded, Adversarial, Supervised) if isinstance(m, c)}
    assert declared == CAPABILITIES[name]
    out = m(x, generator=torch.Generator().manual_seed(0), step=0, labels=labels)  # every family takes all three
    assert out.total.ndim == 0
    with torch.no_grad():
        z, recon = m.encode(x), m.reconstruct(x)
    assert isinstance(z, torch.Tensor) and len(z) == 3  # one latent per image, a tensor for every family
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    if isinstance(m, Variational):
        torch.testing.assert_close(z, m.posterior(x)[0])  # encode: the posterior means
    if isinstance(m, Coded):
        assert z.dtype == torch.long and 0 <= z.min() and z.max() < m.codebook_size
    if isinstance(m, Generative):
        assert m.sample(2).shape == (2, 1, 8, 8)
    if isinstance(m, Supervised):
        assert out.logits.shape == (3, m.num_classes)


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_the_optimizer_groups_are_what_the_phase_trains_without_the_critic(name):
    m = model(name)
    grouped = {id(p) for g in m.optimizer_groups() for p in g["params"]}
    critic = {id(p) for p in m.discriminator.parameters()} if isinstance(m, Adversarial) else set()
    assert grouped == {id(p) for p in m.parameters() if p.requires_grad} - critic
    if isinstance(m, Adversarial):
        assert {id(p) for g in m.critic_optimizer_groups() for p in g["params"]} == critic


def test_the_adversarial_schedule_follows_the_step_passed_in():
    m = model("resvae_gan").train()
    x = torch.rand(4, 1, 8, 8)
    assert m(x, step=4).losses["adversarial"] == 0 and not m.critic_active(4)  # disc_start = 5
    assert m(x, step=5).losses["adversarial"] != 0 and m.critic_active(5)
    assert int(m.step) == 6  # the steps trained, kept with the weights: evaluation scores as at the end
    m.eval()
    assert m(x).losses["adversarial"] != 0
