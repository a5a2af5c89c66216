"""Residual VAE + PatchGAN: blocks, loss signs, the adaptive weight, the variance regulariser, global-batch
moments under 2 processes, and the two-optimizer loop (2 gloo workers, resume) without Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import init_gloo, make_params

from latentzoo.models import build_model
from latentzoo.models.patchgan import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from latentzoo.models.resnet import PreActBlock
from latentzoo.models.resvae_gan import (
    ResVAEGAN,
    ResVAEGANConfig,
    aggregate_kl,
    aggregate_kl_full,
    aggregate_loss,
    batch_covariance,
    batch_moments,
    variance_penalty,
)

TINY_GAN = {
    "resvae_gan.width": 8,
    "resvae_gan.blocks": 1,
    "resvae_gan.latent_channels": 2,
    "resvae_gan.disc_width": 8,
    "resvae_gan.disc_start": 3,
    "train.batch_size": 32,
    "train.epochs": 1,
}


@pytest.mark.parametrize("resample, c_in, c_out, size_out", [(None, 8, 8, 8), ("down", 8, 16, 4), ("up", 16, 8, 16)])
def test_preact_block_shapes_and_gradients(resample, c_in, c_out, size_out):
    block = PreActBlock(c_in, c_out, resample)
    x = torch.randn(2, c_in, 8, 8, requires_grad=True)
    y = block(x)
    assert y.shape == (2, c_out, size_out, size_out)
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    if resample is None:  # identity block: the shortcut is x itself, no projection
        assert block.project is None


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_resvae_gan_shapes(shape):
    model = build_model("resvae_gan", ResVAEGANConfig(width=8, latent_channels=2, disc_width=8), shape)
    x = torch.rand(4, *shape)
    out = model(x)
    assert out.recon.shape == x.shape and 0 <= out.recon.min() and out.recon.max() <= 1
    assert set(out.losses) == {"recon", "aggregate", "variance", "adversarial"}
    assert model.sample(3).shape == (3, *shape)
    assert model.discriminator(x).shape[:2] == (4, 1)


def test_gan_loss_signs():
    high, low = torch.full((4, 1, 2, 2), 3.0), torch.full((4, 1, 2, 2), -3.0)
    for kind in ("hinge", "bce"):
        # D: lower loss when it scores real high and fake low; G: lower loss when fakes are scored high
        assert discriminator_loss(high, low, kind) < discriminator_loss(low, high, kind)
        assert generator_loss(high, kind) < generator_loss(low, kind)
    assert discriminator_loss(high, low, "hinge") == 0  # both margins met


def test_adaptive_weight_toy_graph():
    """rec = (w·a)²/2 and gan = (w·b) give ∇rec = (w·a)a and ∇gan = b: λ = |w·a|·|a| / |b|."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.5])
    rec, gan = 0.5 * (w @ a) ** 2, w @ b
    expected = abs(float(w.detach() @ a)) * float(a.norm()) / (float(b.norm()) + 1e-4)
    assert float(adaptive_weight(rec, gan, w)) == pytest.approx(expected, rel=1e-5)


def test_variance_regulariser_pushes_collapsed_sigma_up():
    logvar = torch.tensor([[-10.0, 0.0, 2.0]], requires_grad=True)
    variance_penalty(logvar).sum().backward()
    assert logvar.grad[0, 0] < 0  # descent raises a collapsed log σ²
    assert logvar.grad[0, 1] == 0  # σ = 1 is the minimum
    assert logvar.grad[0, 2] > 0
    assert float(variance_penalty(torch.zeros(1, 3))) == 0


def test_mixture_posterior_has_no_mu_squared_term():
    """Per-sample means may spread out: only the mixture's moments are pulled to N(0, 1)."""
    mu, logvar = torch.tensor([[3.0], [-3.0]]), torch.zeros(2, 1)
    mean, var = batch_moments(mu, logvar, global_batch=False)
    assert float(mean) == 0 and float(var) == pytest.approx(9.0 + 1.0)  # Var(mu) + mean sigma^2
    assert float(aggregate_kl(torch.zeros(1), torch.ones(1))) == 0


LOGVAR = torch.linspace(-3, 1, 16 * 6).reshape(16, 6)


def test_full_covariance_kl_is_the_gaussian_kl_and_penalises_correlation():
    torch.manual_seed(0)
    mu = torch.randn(4096, 3) @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 1.5]]) + 0.3
    logvar = torch.full_like(mu, -2.0)
    mean, cov = batch_covariance(mu, logvar, global_batch=False)
    torch.testing.assert_close(torch.diag(cov), batch_moments(mu, logvar, global_batch=False)[1], rtol=1e-4, atol=1e-4)
    mixture = torch.distributions.MultivariateNormal(mean, cov)
    prior = torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3))
    expected = float(torch.distributions.kl_divergence(mixture, prior))
    assert float(aggregate_kl_full(mean, cov)) == pytest.approx(expected, rel=1e-4)
    assert float(aggregate_kl_full(mean, cov)) > float(aggregate_kl(mean, torch.diag(cov)))  # + the correlation


@pytest.mark.parametrize("latent_dim, shape", [(0, (2, 2, 2)), (5, (5,))])
def test_dense_and_spatial_latents(latent_dim, shape):
    cfg = ResVAEGANConfig(width=8, latent_channels=2, latent_dim=latent_dim, moments="full")
    model = ResVAEGAN(cfg, (1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    out = model(x)
    assert model.latent_shape == shape and model.encode(x).shape == (6, torch.Size(shape).numel())
    assert model.sample(3).shape == (3, 1, 8, 8) and out.recon.shape == x.shape
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("discriminator"))


def test_the_critic_can_judge_prior_samples_too():
    cfg = ResVAEGANConfig(
        width=8, latent_channels=2, latent_dim=4, disc_width=8, disc_start=0, adversarial_samples=True
    )
    model = ResVAEGAN(cfg, (1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    out = model(x)
    assert out.fakes.shape == (12, 1, 8, 8) and torch.equal(out.fakes[:6], out.recon)  # reconstructions + samples
    out.losses["adversarial"].backward()
    assert model.decoder[-1].weight.grad.abs().sum() > 0 and model.discriminator.net[0].weight.grad is None
    disc = model.critic_losses(x, out.fakes, model.discriminator)
    assert disc.total > 0 and disc.total.requires_grad


def _moments_worker(rank: int, world: int, rendezvous: str, mu: torch.Tensor, moments: str, out_dir: str) -> None:
    init_gloo(rank, world, rendezvous)
    local = mu.chunk(world)[rank].clone().requires_grad_(True)
    loss = aggregate_loss(local, LOGVAR.chunk(world)[rank], moments, global_batch=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local.grad}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("moments", ["diagonal", "full"])
def test_batch_moments_two_workers_match_one(tmp_path, moments):
    torch.manual_seed(0)
    mu = torch.randn(16, 6) * 2 + 0.5
    full = mu.clone().requires_grad_(True)
    loss = aggregate_loss(full, LOGVAR, moments, global_batch=True)  # no process group here: the whole batch
    loss.backward()
    mp.spawn(_moments_worker, args=(2, str(tmp_path / "rendezvous"), mu, moments, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert float(got["loss"]) == pytest.approx(loss.item(), rel=1e-5)
        # each rank's gradient is world x the global one on its samples; DDP's average over ranks divides it back
        torch.testing.assert_close(got["grad"] / 2, full.grad.chunk(2)[rank], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the training loop, two optimizers, no Ray


def fake_session(rank: int, world: int, saved: list, resume=None):
    """A `Session` without Ray: DDP over the process group, checkpoints copied out of report's temp dir."""
    import ray.train

    from latentzoo.training.loop import Session

    def report(row, checkpoint=None):
        if checkpoint is not None:
            saved.append(shutil.copytree(checkpoint.path, Path(saved_dir) / f"epoch{row['epoch']}"))

    saved_dir = saved.pop(0)
    ddp = (lambda m: torch.nn.parallel.DistributedDataParallel(m)) if world > 1 else (lambda m: m)
    return Session(rank, world, world, lambda: resume, report, ray.train.Checkpoint, ddp, torch.device("cpu"))


def gan_job(shards: Path, **overrides):
    from latentzoo.training.job import training_data

    params = make_params(**{**TINY_GAN, **overrides})
    return training_data(params, "resvae_gan", shards).job(params, "resvae_gan")  # as the train stage builds it


def _loop_worker(rank: int, world: int, rendezvous: str, job, out_dir: str) -> None:
    from latentzoo.training.loop import run_loop

    init_gloo(rank, world, rendezvous)
    saved = [out_dir]
    run_loop(job, fake_session(rank, world, saved))
    dist.destroy_process_group()


def load_checkpoint(path: Path) -> dict:
    from latentzoo.checkpoint import CHECKPOINT_FILE, load_state

    return load_state(Path(path) / CHECKPOINT_FILE)


def test_two_workers_two_optimizers_complete_in_sync(digits_shards, tmp_path):
    job = gan_job(digits_shards)
    mp.spawn(_loop_worker, args=(2, str(tmp_path / "rendezvous"), job, str(tmp_path)), nprocs=2, join=True)
    state = load_checkpoint(tmp_path / "epoch1")
    row = state["history"][-1]
    assert row["replicas_in_sync"] == 1.0  # generator and discriminator weights identical on both ranks
    assert row["train_disc_loss"] > 0 and "train_loss_adversarial" in row
    steps = row["steps_max"]
    assert int(state["model"]["step"]) == state["step"] == steps  # the loop's count, recorded with the weights
    disc_steps = steps - 3 + 1  # D trains once the step counter reaches disc_start = 3
    assert max(s["step"] for s in state["disc_optimizer"]["state"].values()) == disc_steps


def test_resume_restores_discriminator_and_step(digits_shards, tmp_path):
    import ray.train

    from latentzoo.training.loop import run_loop

    first = gan_job(digits_shards)
    run_loop(first, fake_session(0, 1, [str(tmp_path / "a")]))
    saved = load_checkpoint(tmp_path / "a" / "epoch1")
    second = gan_job(digits_shards, **{"train.epochs": 2})
    run_loop(second, fake_session(0, 1, [str(tmp_path / "b")], ray.train.Checkpoint(tmp_path / "a" / "epoch1")))
    resumed = load_checkpoint(tmp_path / "b" / "epoch2")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]  # epoch 1 not trained again
    assert int(resumed["model"]["step"]) == resumed["step"] == 2 * saved["step"]  # the step count continued
    disc_step = lambda s: max(v["step"] for v in s["disc_optimizer"]["state"].values())  # noqa: E731
    assert disc_step(resumed) == disc_step(saved) + int(saved["model"]["step"])  # D's Adam state restored
    assert not torch.equal(resumed["model"]["discriminator.net.0.weight"], saved["model"]["discriminator.net.0.weight"])


def test_patch_discriminator_gives_patch_grid():
    d = PatchDiscriminator(3, width=8, layers=2)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 8, 8)
