"""VQ-VAE and SimVQ autoencoders: shapes, loss terms, gradients, learning on real digits, encode/decode."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from latentzoo.errors import ConfigError
from latentzoo.models import REGISTRY, build_model
from latentzoo.models.quantizer import SimVQ, VectorQuantizer, codebook_usage
from latentzoo.models.vqvae import VQVAE, SimVQConfig, VQVAEConfig
from latentzoo.training.loop import set_lr

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CONFIGS = {
    "vqvae": VQVAEConfig(hidden_channels=8, codebook_dim=4, codebook_size=32),
    "vqvae-ema-restart-kmeans": VQVAEConfig(
        hidden_channels=8, codebook_dim=4, codebook_size=32, ema=True, restart_after=5, kmeans_init=True
    ),
    "simvq": SimVQConfig(hidden_channels=8, codebook_dim=4, codebook_size=32),
}


def images(shape, n=4, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes_and_loss_terms(name, shape):
    cfg = CONFIGS[name]
    model = VQVAE(cfg, shape)
    x = images(shape)
    out = model(x)
    assert out.recon.shape == x.shape and 0 <= out.recon.min() and out.recon.max() <= 1
    assert out.codes.shape == (4, shape[1] // 4, shape[2] // 4) and out.codes.max() < 32
    expected = {"recon", "commitment"} | (set() if getattr(cfg, "ema", False) else {"codebook"})
    assert set(out.losses) == expected and all(v.ndim == 0 for v in out.losses.values())
    torch.testing.assert_close(out.losses["recon"], torch.nn.functional.mse_loss(out.recon, x))
    assert model.codebook_size == 32


def test_registry_builds_both_families_with_their_quantizer():
    assert REGISTRY["vqvae"].config_cls is VQVAEConfig and REGISTRY["simvq"].config_cls is SimVQConfig
    assert isinstance(build_model("vqvae", CONFIGS["vqvae"], (1, 8, 8)).quantizer, VectorQuantizer)
    assert isinstance(build_model("simvq", CONFIGS["simvq"], (1, 8, 8)).quantizer, SimVQ)
    with pytest.raises(TypeError, match="needs a SimVQConfig"):
        build_model("simvq", CONFIGS["vqvae"], (1, 8, 8))


@pytest.mark.parametrize("shape", [(1, 10, 10), (3, 32, 30)])
def test_bad_image_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError, match=r"divisible by 4.*image shape"):
        VQVAE(CONFIGS["simvq"], shape)


@pytest.mark.parametrize("name", ["vqvae", "simvq"])
def test_gradients_reach_every_parameter(name):
    model = VQVAE(CONFIGS[name], (1, 8, 8))
    model(images((1, 8, 8), n=16)).total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("name", CONFIGS)
def test_learns_real_digits_and_uses_its_codebook(name):
    torch.manual_seed(0)
    digits = torch.tensor(load_digits().images[:512], dtype=torch.float32)[:, None] / 16.0
    model = VQVAE(CONFIGS[name], (1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        batch = digits[(step * 64) % 512 :][:64]
        out = model(batch)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        first = first if first is not None else out.losses["recon"].item()
    model.eval()
    with torch.no_grad():
        out = model(digits)
    assert out.losses["recon"].item() < 0.5 * first
    used = codebook_usage(out.codes, 32)["utilisation"]
    # 150 steps are too few for the learned codebooks to spread; restarts keep every code in use
    assert used == 1.0 if name == "vqvae-ema-restart-kmeans" else used >= 3 / 32


def test_the_codebook_learns_at_its_own_rate():
    cfg = SimVQConfig(hidden_channels=8, codebook_dim=4, codebook_size=32, codebook_lr_scale=5.0)
    model = VQVAE(cfg, (1, 8, 8))
    rest, codebook = model.optimizer_groups()
    assert codebook["params"] == [model.quantizer.codebook_transform.weight] and codebook["lr_scale"] == 5.0
    assert len(rest["params"]) + 1 == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(model.optimizer_groups(), lr=1e-3)
    set_lr(optimizer, 2e-3)  # what the loop does at every epoch, with its schedule
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 1e-2])
    assert len(VQVAE(CONFIGS["vqvae-ema-restart-kmeans"], (1, 8, 8)).optimizer_groups()) == 1  # EMA: no parameters


def test_encode_then_decode_is_the_reconstruction():
    model = VQVAE(CONFIGS["simvq"], (1, 28, 28)).eval()
    x = images((1, 28, 28))
    codes = model.encode(x)
    assert codes.shape == (4, 7, 7) and codes.dtype == torch.int64
    torch.testing.assert_close(model.decode(codes), model(x).recon)
