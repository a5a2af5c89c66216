"""VQ-VAE quantiser (arXiv 1711.00937) and SimVQ (arXiv 2411.02038): chunked nearest codes, straight-through
gradients, loss terms, EMA updates, dead-code restarts, k-means init, SimVQ's frozen C and trained W, usage
statistics, and identical codebooks across ranks under torch.distributed (gloo)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import init_gloo

from latentzoo.models.quantizer import (
    CodeCounter,
    SimVQ,
    VectorQuantizer,
    codebook_usage,
    kmeans,
    nearest_codes,
    rotate_to,
)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- nearest_codes


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 50, 1024])
def test_nearest_codes_matches_cdist(chunk_size):
    z, codebook = randn(200, 8, seed=1, dtype=torch.float64), randn(50, 8, seed=2, dtype=torch.float64)
    expected = torch.cdist(z, codebook).argmin(dim=1)
    got = nearest_codes(z, codebook, chunk_size)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


def test_nearest_codes_large_codebook_in_chunks():
    z, codebook = randn(4096, 64, seed=3), randn(65536, 64, seed=4)
    got = nearest_codes(z, codebook, chunk_size=1024)
    assert got.shape == (4096,) and got.dtype == torch.int64
    rows = slice(0, 64)
    brute = torch.cdist(z[rows].double(), codebook.double())
    # float32 rounding may flip near-ties: compare the distances reached, not the indices
    reached = brute.gather(1, got[rows, None]).squeeze(1)
    torch.testing.assert_close(reached, brute.min(dim=1).values, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("shape, index_shape", [((2, 4, 3, 5), (2, 3, 5)), ((10, 4), (10,))])
def test_forward_shapes(shape, index_shape):
    vq = VectorQuantizer(16, 4)
    z = randn(*shape)
    quantized, indices, losses = vq(z)
    assert quantized.shape == z.shape and indices.shape == index_shape and indices.dtype == torch.int64
    assert set(losses) == {"codebook", "commitment"} and all(v.ndim == 0 for v in losses.values())
    flat = z if z.ndim == 2 else z.permute(0, 2, 3, 1).reshape(-1, 4)
    flat_q = quantized if z.ndim == 2 else quantized.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(flat_q, vq.codebook[indices.flatten()].detach())
    assert torch.equal(indices.flatten(), nearest_codes(flat, vq.codebook.detach()))


def test_straight_through_gradient():
    vq = VectorQuantizer(8, 3)
    z = randn(2, 3, 4, 4).requires_grad_()
    quantized, _, _ = vq(z)
    quantized.retain_grad()
    weights = randn(*z.shape, seed=5)
    (quantized * weights).sum().backward()  # linear loss: dL/dq = weights
    torch.testing.assert_close(z.grad, quantized.grad)
    torch.testing.assert_close(z.grad, weights)
    assert vq.codebook.grad is None  # the reconstruction path does not reach the codebook


def test_the_rotation_trick_gives_the_code_and_rotates_the_gradient():
    z, q = randn(64, 5).requires_grad_(), randn(64, 5, seed=1)
    rotated = rotate_to(z, q)
    torch.testing.assert_close(rotated, q)  # forward: the code itself
    weights = randn(64, 5, seed=2)
    (rotated * weights).sum().backward()
    scale = q.norm(dim=1) / z.detach().norm(dim=1)
    torch.testing.assert_close(z.grad.norm(dim=1), scale * weights.norm(dim=1))  # lambda R^T g: R keeps lengths
    assert not torch.allclose(z.grad, scale[:, None] * weights)  # but turns the gradient

    along = randn(4, 5, seed=3).requires_grad_()
    (rotate_to(along, 3 * along.detach()) * weights[:4]).sum().backward()  # q along z: R = I, lambda = 3
    torch.testing.assert_close(along.grad, 3 * weights[:4])


@pytest.mark.parametrize(
    "make", [lambda: VectorQuantizer(8, 3, rotation_trick=True), lambda: SimVQ(8, 3, rotation_trick=True)]
)
def test_a_quantizer_with_the_rotation_trick_keeps_its_codes_and_losses(make):
    vq = make()
    z = randn(2, 3, 4, 4).requires_grad_()
    quantized, codes, losses = vq(z)
    vq.rotation_trick = False
    plain, plain_codes, plain_losses = vq(z)
    torch.testing.assert_close(quantized, plain)
    assert torch.equal(codes, plain_codes) and losses.keys() == plain_losses.keys()
    (quantized * randn(*z.shape, seed=5)).sum().backward()
    assert z.grad is not None and all(p.grad is None for p in vq.parameters())  # only the losses train the codebook


def test_codebook_gradient_only_from_codebook_loss():
    vq = VectorQuantizer(8, 3, commitment_weight=0.7)
    z = randn(20, 3).requires_grad_()
    quantized, indices, losses = vq(z)
    (quantized.sum() + losses["commitment"]).backward()
    assert vq.codebook.grad is None
    losses["codebook"].backward()
    assert vq.codebook.grad is not None and vq.codebook.grad[indices].abs().sum() > 0
    unused = torch.ones(8, dtype=torch.bool)
    unused[indices] = False
    assert torch.all(vq.codebook.grad[unused] == 0)


def test_loss_values():
    vq = VectorQuantizer(8, 3, commitment_weight=0.7)
    z = randn(2, 3, 4, 4)
    quantized, _, losses = vq(z)
    q = quantized.detach()
    torch.testing.assert_close(losses["commitment"], 0.7 * F.mse_loss(z, q))
    torch.testing.assert_close(losses["codebook"], F.mse_loss(z, q))


def test_loss_values_by_hand():
    vq = VectorQuantizer(2, 2, commitment_weight=0.25)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    z = torch.tensor([[0.5, -0.5], [3.0, 2.0]])  # nearest: code 0 (d² 0.5), code 1 (d² 1.0)
    quantized, indices, losses = vq(z)
    assert indices.tolist() == [0, 1]
    assert quantized.tolist() == [[0.0, 0.0], [2.0, 2.0]]
    # mean over the 4 elements of (z - e)^2: (0.25 + 0.25 + 1 + 0) / 4 = 0.375
    assert math.isclose(losses["codebook"].item(), 0.375, rel_tol=1e-6)
    assert math.isclose(losses["commitment"].item(), 0.25 * 0.375, rel_tol=1e-6)


# ---------------------------------------------------------------- EMA


def clustered(centres, n_per=50, noise=0.01, seed=0):
    points = centres.repeat_interleave(n_per, dim=0)
    return points + noise * randn(*points.shape, seed=seed)


def test_ema_moves_used_codes_towards_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2, ema=True, decay=0.5)
    assert "embed" in dict(vq.named_buffers()) and not list(vq.parameters())
    centres = torch.tensor([[3.0, 3.0], [-3.0, 2.0], [1.0, -4.0]])
    z = clustered(centres)
    before = vq.codebook.clone()
    _, indices, losses = vq(z)
    assert "codebook" not in losses and not vq.codebook.requires_grad
    for i in range(3):
        codes = indices[i * 50 : (i + 1) * 50].unique()
        dist_before = (before[codes] - centres[i]).norm(dim=1)
        dist_after = (vq.codebook[codes] - centres[i]).norm(dim=1)
        assert torch.all(dist_after < dist_before)
    unused = torch.ones(16, dtype=torch.bool)
    unused[indices] = False
    # unused codes drift only by Laplace smoothing
    torch.testing.assert_close(vq.codebook[unused], before[unused], rtol=0.05, atol=1e-3)


def test_ema_converges_to_cluster_means():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=True, decay=0.8)
    centres = torch.tensor([[3.0, 3.0], [-3.0, 2.0], [1.0, -4.0]])
    z = clustered(centres)
    for _ in range(60):
        vq(z)
    _, indices, _ = vq(z)
    for i in range(3):
        code = indices[i * 50]
        torch.testing.assert_close(vq.codebook[code], z[i * 50 : (i + 1) * 50].mean(0), atol=2e-2, rtol=0)


def test_eval_mode_leaves_codebook_unchanged():
    for kwargs in ({"ema": True}, {"ema": True, "restart_after": 1}, {"restart_after": 1}):
        vq = VectorQuantizer(16, 2, **kwargs).eval()
        state = {k: v.clone() for k, v in vq.state_dict().items()}
        vq(clustered(torch.tensor([[3.0, 3.0]])))
        assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items()), kwargs


# ---------------------------------------------------------------- dead-code restart


@pytest.mark.parametrize("ema", [False, True])
def test_restart_reseeds_unused_codes_from_batch(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, ema=ema, restart_after=1)
    with torch.no_grad():
        vq.codebook.fill_(100.0)
        vq.codebook[0] = 0.0
        if ema:
            vq.embed_avg.copy_(vq.codebook)
    z = randn(32, 3).requires_grad_()
    quantized, indices, losses = vq(z)
    assert torch.all(indices == 0)
    dist_to_batch = torch.cdist(vq.codebook[1:].detach(), z.detach())
    assert torch.all(dist_to_batch.min(dim=1).values == 0)  # each restarted code is a row of z
    assert len({tuple(r) for r in vq.codebook[1:].tolist()}) == 7  # distinct rows: enough to draw from
    assert torch.all(vq.steps_unused == 0)
    if not ema:
        torch.testing.assert_close(vq.codebook[0].detach(), torch.zeros(3))
        (quantized.sum() + losses["codebook"] + losses["commitment"]).backward()  # still differentiable


def test_more_dead_codes_than_rows_restart_without_duplicates():
    torch.manual_seed(0)
    vq = VectorQuantizer(256, 4, restart_after=1)
    with torch.no_grad():
        vq.codebook.fill_(100.0)
        vq.codebook[0] = 0.0
    z = randn(16, 4)  # 255 dead codes, 16 rows to restart them from
    vq(z)
    assert len({tuple(r) for r in vq.codebook.tolist()}) == 1 + 16 + 1  # code 0, 16 distinct rows, the rest at 100
    assert int((vq.steps_unused == 0).sum()) == 1 + 16  # the other dead codes wait for the next steps
    for step in range(1, 20):
        vq(randn(16, 4, seed=step))  # new batches: the longest-dead codes are restarted first
    assert len({tuple(r) for r in vq.codebook.tolist()}) == 256  # none left at 100, no two codes alike


def test_the_initial_codebook_is_vector_quantize_pytorchs():
    torch.manual_seed(0)
    codebook = VectorQuantizer(512, 64).codebook.detach()
    bound = (6 / (512 * 64)) ** 0.5  # kaiming-uniform of a (1, K, D) tensor
    assert codebook.abs().max() <= bound and codebook.abs().max() > 0.99 * bound
    assert abs(codebook.std().item() - bound / 3**0.5) < 0.01 * bound


def test_restart_waits_restart_after_steps():
    vq = VectorQuantizer(4, 2, restart_after=3)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    z = randn(10, 2)
    for _ in range(2):
        vq(z)
    assert torch.all(vq.codebook[1:] >= 50)
    vq(z)
    assert torch.all(vq.codebook[1:] < 50)


# ---------------------------------------------------------------- k-means init


def assert_lloyd_fixed_point(z, centroids, atol=1e-4):
    """Every non-empty centroid is the mean of the points nearest to it."""
    assign = nearest_codes(z, centroids)
    for k in assign.unique():
        torch.testing.assert_close(centroids[k], z[assign == k].mean(0), atol=atol, rtol=0)


def within_cluster_error(z, centroids):
    return torch.cdist(z, centroids).min(dim=1).values.pow(2).sum()


def test_kmeans_converges_and_beats_its_random_start():
    torch.manual_seed(0)
    z = clustered(torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0], [6.0, -6.0]]), n_per=40)
    torch.manual_seed(1)
    start = z[torch.randperm(len(z))[:4]]
    torch.manual_seed(1)
    found, counts = kmeans(z, 4, iters=20)
    assert counts.sum() == len(z) and found.shape == (4, 2)
    assert_lloyd_fixed_point(z, found)
    assert within_cluster_error(z, found) < within_cluster_error(z, start)


def test_kmeans_with_fewer_points_than_clusters_keeps_every_centroid_finite():
    found, counts = kmeans(randn(5, 3), 16, iters=3)
    assert found.shape == (16, 3) and torch.isfinite(found).all() and counts.sum() == 5


@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_on_first_training_batch_only(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 2, ema=ema, kmeans_init=True)
    assert not vq.initted
    vq.eval()(randn(10, 2))
    assert not vq.initted  # evaluation never initialises
    z = clustered(torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0]]), n_per=40)
    vq.train()(z)
    assert vq.initted
    assert_lloyd_fixed_point(z, vq.codebook.detach(), atol=1e-3)  # the codebook is k-means of the batch
    if ema:  # running statistics agree with the centroids: e = m / N
        torch.testing.assert_close(vq.embed_avg / vq.cluster_size[:, None], vq.codebook, atol=1e-3, rtol=0)
    after_first = vq.codebook.detach().clone()
    vq(randn(30, 2) * 100)  # a second batch updates (EMA) or not (no EMA) but never re-runs k-means
    if not ema:
        assert torch.equal(vq.codebook.detach(), after_first)
    restored = VectorQuantizer(3, 2, ema=ema, kmeans_init=True)
    restored.load_state_dict(vq.state_dict())
    assert restored.initted  # a checkpoint remembers it: a resumed run does not re-initialise


# ---------------------------------------------------------------- SimVQ


def test_simvq_codebook_is_frozen_c_times_learned_w():
    torch.manual_seed(0)
    vq = SimVQ(4096, 16)
    c = vq.frozen_codebook
    assert "frozen_codebook" in dict(vq.named_buffers()) and not c.requires_grad
    assert [name for name, _ in vq.named_parameters()] == ["codebook_transform.weight"]
    assert abs(c.std().item() - 16**-0.5) < 0.01 and abs(c.mean().item()) < 0.01  # C ~ N(0, 1/D)
    torch.testing.assert_close(vq.codebook, c @ vq.codebook_transform.weight.t())
    indices = torch.tensor([3, 0, 4095])
    torch.testing.assert_close(vq.lookup(indices), vq.codebook[indices])


def test_simvq_trains_w_and_moves_every_code():
    torch.manual_seed(0)
    vq = SimVQ(64, 4)
    c_before, codebook_before = vq.frozen_codebook.clone(), vq.codebook.detach().clone()
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.5)
    z = randn(8, 4) * 3
    _, indices, losses = vq(z)
    assert set(losses) == {"codebook", "commitment"}
    (losses["codebook"] + losses["commitment"]).backward()
    assert vq.codebook_transform.weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(vq.frozen_codebook, c_before)  # C never changes
    moved = (vq.codebook.detach() - codebook_before).norm(dim=1) > 1e-6
    assert indices.unique().numel() < 64 and moved.all()  # codes no batch chose moved too


def test_simvq_bias_shifts_every_code_and_trains():
    torch.manual_seed(0)
    vq = SimVQ(64, 4, bias=True)
    assert [name for name, _ in vq.named_parameters()] == ["codebook_transform.weight", "codebook_transform.bias"]
    layer = vq.codebook_transform
    torch.testing.assert_close(vq.codebook, vq.frozen_codebook @ layer.weight.t() + layer.bias)
    _, _, losses = vq(randn(8, 4) * 3 + 5)  # latents centred away from the origin
    losses["codebook"].backward()
    assert layer.bias.grad.abs().sum() > 0


def test_simvq_straight_through_and_state_round_trip():
    vq = SimVQ(32, 4)
    z = randn(2, 4, 3, 3).requires_grad_()
    quantized, indices, _ = vq(z)
    quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    other = SimVQ(32, 4)
    other.load_state_dict(vq.state_dict())  # C is saved with the weights: the codes survive a reload
    assert torch.equal(other(z.detach())[1], indices)


# ---------------------------------------------------------------- usage and errors


def test_code_counter_accumulates_batches():
    counter = CodeCounter(8)
    counter.add(torch.tensor([[0, 2], [4, 6]]))
    counter.add(torch.tensor([0, 2, 4, 6] * 4))
    assert counter.counts.tolist() == [5, 0, 5, 0, 5, 0, 5, 0]
    assert counter.usage() == codebook_usage(torch.tensor([0, 2, 4, 6]), 8)


def test_codebook_usage_known_histogram():
    usage = codebook_usage(torch.tensor([0, 2, 4, 6] * 5), 8)
    assert usage["utilisation"] == 0.5 and usage["dead_codes"] == 4
    assert math.isclose(usage["perplexity"], 4.0, rel_tol=1e-9)
    single = codebook_usage(torch.zeros(2, 3, dtype=torch.long), 8)
    assert single == {"utilisation": 0.125, "perplexity": 1.0, "dead_codes": 7}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codebook_size": 0, "dim": 4}, "codebook_size"),
        ({"codebook_size": 4, "dim": 0}, "dim"),
        ({"codebook_size": 4, "dim": 4, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(**kwargs)
    with pytest.raises(ValueError, match=match):
        SimVQ(**kwargs)


def test_channel_mismatch_message():
    vq = VectorQuantizer(16, 64)
    with pytest.raises(ValueError, match="quantizer dim 64 does not match the encoder's 32 channels"):
        vq(torch.zeros(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, D\) or \(B, D, H, W\)"):
        vq(torch.zeros(2, 64, 4))


# ---------------------------------------------------------------- torch.distributed


def _ddp_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    init_gloo(rank, world_size, rendezvous)
    try:
        torch.manual_seed(0)  # same initial codebook on every rank
        vq = VectorQuantizer(32, 4, ema=True, decay=0.9, restart_after=1, kmeans_init=True)
        torch.manual_seed(100 + rank)  # different data, k-means and restart draws per rank
        for _ in range(3):
            vq(torch.randn(2, 4, 3, 3) + 5 * rank)
        torch.save({"codebook": vq.codebook.clone(), "state": vq.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_distributed_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"])
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    torch.manual_seed(0)
    assert not torch.equal(r0["codebook"], VectorQuantizer(32, 4, ema=True).codebook)  # it did train
