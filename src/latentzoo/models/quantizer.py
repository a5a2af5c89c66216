"""Vector quantiser of VQ-VAE, van den Oord et al., "Neural Discrete Representation Learning", arXiv 1711.00937.

Each encoder output z_e(x) in R^D is replaced by its nearest codebook vector,

    k = argmin_j ||z_e(x) - e_j||^2,    z_q(x) = e_k,

and the decoder's gradient is copied straight through to z_e (z_q = z_e + sg[e_k - z_e]), or, with
`rotation_trick=True`, carried to z_e by the rotation that takes z_e onto e_k (Fifty et al., arXiv 2410.06424;
see `rotate_to`). Training adds

    L = ||sg[z_e] - e||^2  (codebook)  +  beta ||z_e - sg[e]||^2  (commitment),

or, with `ema=True`, drops the codebook term and moves each e_k to the running mean of the z_e assigned to it
(arXiv 1711.00937, App. A.1). Codes unused for `restart_after` steps are re-seeded from the batch's z_e, and
`kmeans_init` places the codebook on k-means centroids of the first training batch.

SimVQ (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear Layer",
arXiv 2411.02038) keeps the same losses but reparameterises the codebook as e = C W^T: C (K, D) is a frozen random
matrix, W (D, D) the one learnable linear layer, so every gradient step on W moves every code at once.

Under torch.distributed the code statistics are summed over ranks and re-seeded vectors and k-means centroids
are computed on rank 0 and broadcast, so every rank keeps the same codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from latentzoo.ddp import is_distributed

# ---------------------------------------------------------------- nearest code


ROW_BLOCK = 512  # rows per block on CPU: a 512 x 1024 float32 score block (2 MiB) stays in a core's L2 cache


@torch.no_grad()
def nearest_codes(z: Tensor, codebook: Tensor, chunk_size: int = 1024) -> Tensor:
    """Indices (N,) int64 of argmin_j ||z_i - e_j||^2 for z (N, D) and codebook (K, D).

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 is the same for every code, so the search ranks
    ||e||^2 - 2 z.e = [z, 1] . [-2e, ||e||^2]: one matmul per block of `chunk_size` codes (and, on CPU, of
    ROW_BLOCK rows, so the block stays in cache), keeping a running (best score, best index) per row. At most a
    rows x chunk_size score matrix exists at once. Ties go to the lowest index, as in torch.argmin.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, k = z.shape[0], codebook.shape[0]
    z1 = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (N, D + 1)
    e1 = torch.cat([-2 * codebook, codebook.pow(2).sum(dim=1, keepdim=True)], dim=1)  # (K, D + 1)
    rows = ROW_BLOCK if z.device.type == "cpu" and k > chunk_size else max(n, 1)
    indices = torch.empty(n, device=z.device, dtype=torch.long)
    for r in range(0, n, rows):
        block = z1[r : r + rows]
        best = torch.full((block.shape[0],), math.inf, device=z.device, dtype=z.dtype)
        best_idx = torch.zeros(block.shape[0], device=z.device, dtype=torch.long)
        for start in range(0, k, chunk_size):
            chunk_best, chunk_idx = (block @ e1[start : start + chunk_size].t()).min(dim=1)
            better = chunk_best < best  # strict: an earlier chunk keeps ties
            best = torch.where(better, chunk_best, best)
            best_idx = torch.where(better, chunk_idx + start, best_idx)
        indices[r : r + rows] = best_idx
    return indices


def codebook_usage(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of a codebook by `indices` (any shape); see `usage_from_counts`."""
    return usage_from_counts(torch.bincount(indices.flatten().long(), minlength=codebook_size))


def usage_from_counts(counts: Tensor) -> dict[str, float]:
    """From a code histogram (K,): fraction of codes used, perplexity exp(H(p)) of p = counts / sum (K means
    uniform over all codes, 1 a single code), and the number of unused ("dead") codes."""
    counts = counts.double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "utilisation": used / counts.numel(),
        "perplexity": float(entropy.exp()),
        "dead_codes": float(counts.numel() - used),
    }


class CodeCounter:
    """A histogram of code indices over many batches (an epoch, a test split), summed over ranks on demand."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    def add(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.flatten(), minlength=self.counts.numel()).to(self.counts.device)

    def usage(self, all_ranks: bool = False) -> dict[str, float]:
        """`usage_from_counts` of this rank's histogram, or of the sum over ranks (a collective: every rank calls)."""
        counts = all_reduce_sum(self.counts.clone()) if all_ranks else self.counts
        return usage_from_counts(counts.cpu())


# ---------------------------------------------------------------- distributed helpers


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (identity outside torch.distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(t: Tensor) -> Tensor:
    """Overwrite `t` on every rank with rank 0's `t`, in place (identity outside torch.distributed)."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def _is_rank0() -> bool:
    return not is_distributed() or dist.get_rank() == 0


# ---------------------------------------------------------------- update rules


def code_stats(z: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per-code counts n_k (K,) and sums sum_{z -> k} z (K, D), summed over ranks in a single all-reduce."""
    stats = torch.zeros(codebook_size, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    stats.index_add_(0, indices, torch.cat([torch.ones_like(z[:, :1]), z], dim=1))
    all_reduce_sum(stats)
    return stats[:, 0], stats[:, 1:]


def _pick_rows(z: Tensor, n: int) -> Tensor:
    if n <= z.shape[0]:
        return z[torch.randperm(z.shape[0], device=z.device)[:n]]
    return z[torch.randint(z.shape[0], (n,), device=z.device)]  # fewer rows than wanted: with replacement


def sample_rows(z: Tensor, n: int) -> Tensor:
    """n rows of z (n, D), chosen at random on rank 0 and broadcast, identical on every rank."""
    out = torch.empty(n, z.shape[1], device=z.device, dtype=z.dtype)
    if _is_rank0():
        out.copy_(_pick_rows(z, n))
    return broadcast_from_rank0(out)


@torch.no_grad()
def kmeans(z: Tensor, k: int, iters: int = 10, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on rows of z (N, D): (centroids (k, D), cluster sizes (k,)).

    Centroids start at k random rows (with replacement when N < k); each iteration assigns every row to its
    nearest centroid and moves each centroid to the mean of its rows; an empty cluster keeps its centroid.
    """
    centroids = _pick_rows(z, k).clone()
    counts = torch.zeros(k, device=z.device, dtype=z.dtype)
    for _ in range(iters):
        assign = nearest_codes(z, centroids, chunk_size)
        counts = torch.zeros(k, device=z.device, dtype=z.dtype).index_add_(0, assign, torch.ones_like(z[:, 0]))
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, counts


# ---------------------------------------------------------------- gradient through the code search


def rotate_to(z: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick (Fifty et al., arXiv 2410.06424, Sec. 4.2): rows of q reached from rows of z as

        q~ = sg[lambda R] z,   lambda = ||q|| / ||z||,   R = I - 2 r r^T + 2 v u^T,
        u = z / ||z||,  v = q / ||q||,  r = (u + v) / ||u + v||,

    R being the rotation in the plane of u and v that takes u to v (so q~ = q in value). The decoder's gradient
    reaches z rotated and scaled by R and lambda, not copied unchanged as by straight-through: it keeps its angle
    to the code and pushes z across the boundary of the code it is given, so the encoder spreads over more codes.
    """
    with torch.no_grad():
        z_norm, q_norm = z.norm(dim=1, keepdim=True).clamp(min=eps), q.norm(dim=1, keepdim=True).clamp(min=eps)
        u, v = z / z_norm, q / q_norm
        r = F.normalize(u + v, dim=1, eps=eps)
        scale = q_norm / z_norm
    rz = z - 2 * (z * r).sum(dim=1, keepdim=True) * r + 2 * (z * u).sum(dim=1, keepdim=True) * v
    return scale * rz


# ---------------------------------------------------------------- modules


def uniform_init(codebook_size: int, dim: int) -> Tensor:
    """e_k ~ U(-b, b)^D, b = sqrt(6 / (K D)): vector-quantize-pytorch's initial codebook (kaiming-uniform of its
    (1, K, D) tensor). The older U(-1/K, 1/K) of the first VQ-VAE ports puts every code within 1/K of the origin,
    far from the encoder outputs, so the few codes nearest the data win every early step and the rest stay dead
    (10% of 512 codes used on MNIST, against 97.5% with this init and the same autoencoder)."""
    bound = math.sqrt(6 / (codebook_size * dim))
    return torch.empty(codebook_size, dim).uniform_(-bound, bound)


class Quantizer(nn.Module):
    """What VectorQuantizer and SimVQ share: z (B, D, H, W) or (N, D) → (z_q straight-through,
    indices (B, H, W) or (N,), losses).

    losses["commitment"] = commitment_weight * mean ||z - sg[e]||^2 always; losses["codebook"] =
    mean ||sg[z] - e||^2 unless the codebook is updated by EMA instead of by gradients. The decoder's gradient
    reaches z straight through, or rotated (`rotation_trick`, see `rotate_to`).
    Subclasses define `codebook` (K, D) and `lookup(indices)`; `prepare` and `update` hook training-time changes.
    """

    ema = False

    def __init__(
        self, codebook_size: int, dim: int, commitment_weight: float, chunk_size: int, rotation_trick: bool = False
    ):
        super().__init__()
        for name, value in (("codebook_size", codebook_size), ("dim", dim), ("chunk_size", chunk_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_weight, self.chunk_size, self.rotation_trick = commitment_weight, chunk_size, rotation_trick

    @property
    def codebook(self) -> Tensor:
        """The codebook e (K, D)."""
        raise NotImplementedError

    def lookup(self, indices: Tensor) -> Tensor:
        """e_k for every index (N,) → (N, D), differentiable in the codebook's parameters."""
        raise NotImplementedError

    def prepare(self, z: Tensor) -> None:
        """Called with the detached flat z (N, D) before the code search of every training step."""

    def update(self, z: Tensor, indices: Tensor) -> None:
        """Called with the detached flat z and its codes after the code search of every training step."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        flat = self._flatten(z)
        if self.training:
            self.prepare(flat.detach())
        with torch.no_grad():
            indices = nearest_codes(flat, self.codebook, self.chunk_size)
        q = self.lookup(indices)  # gradient reaches the codebook's parameters only through q
        losses = {"commitment": self.commitment_weight * F.mse_loss(flat, q.detach())}
        if not self.ema:
            losses["codebook"] = F.mse_loss(flat.detach(), q)
        if self.training:
            self.update(flat.detach(), indices)
        if self.rotation_trick:
            quantized = rotate_to(flat, q.detach())
        else:
            quantized = flat + (q - flat).detach()  # straight-through estimator (arXiv 1711.00937, Sec. 3.2)
        return self._unflatten(quantized, z), self._unflatten_indices(indices, z), losses

    # ------------------------------------------------------------ shapes

    def _flatten(self, z: Tensor) -> Tensor:
        if z.ndim not in (2, 4):
            raise ValueError(f"quantizer takes (N, D) or (B, D, H, W) latents, got shape {tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(f"quantizer dim {self.dim} does not match the encoder's {z.shape[1]} channels")
        return z if z.ndim == 2 else z.permute(0, 2, 3, 1).reshape(-1, self.dim)

    def _unflatten(self, flat: Tensor, like: Tensor) -> Tensor:
        if like.ndim == 2:
            return flat
        b, d, h, w = like.shape
        return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)

    def _unflatten_indices(self, indices: Tensor, like: Tensor) -> Tensor:
        return indices if like.ndim == 2 else indices.reshape(like.shape[0], *like.shape[2:])


class VectorQuantizer(Quantizer):
    """The VQ-VAE codebook e (K, D): a parameter trained by the codebook loss, or with `ema=True` a buffer moved
    to running means of its assigned z; optional dead-code restart and k-means initialisation."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_after: int = 0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        chunk_size: int = 1024,
        rotation_trick: bool = False,
    ):
        super().__init__(codebook_size, dim, commitment_weight, chunk_size, rotation_trick)
        self.ema, self.decay, self.eps = ema, decay, eps
        self.restart_after, self.kmeans_init, self.kmeans_iters = restart_after, kmeans_init, kmeans_iters
        init = uniform_init(codebook_size, dim)
        if ema:
            self.register_buffer("embed", init)
            # N_k = 1 and m_k = e_k: e_k = m_k / N_k starts at the initial codebook (App. A.1 leaves it open)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", init.clone())
        else:
            self.embed = nn.Parameter(init)
        if restart_after > 0:
            self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        # saved with the weights, so a resumed or loaded model is not initialised again
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def lookup(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embed)

    def prepare(self, z: Tensor) -> None:
        if self.kmeans_init and not self.initted:
            self._kmeans_init(z)

    @torch.no_grad()
    def update(self, z: Tensor, indices: Tensor) -> None:
        """EMA step and dead-code restart from this step's code statistics (summed over ranks)."""
        if not (self.ema or self.restart_after > 0):
            return
        z = z.to(self.embed.dtype)
        counts, sums = code_stats(z, indices, self.codebook_size)
        if self.ema:
            self._ema_update(counts, sums)
        if self.restart_after > 0:
            self._restart_dead(z, counts)

    # ------------------------------------------------------------ training-time codebook updates

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        """Codebook ← k-means centroids of rank 0's first batch, broadcast to every rank."""
        centroids = torch.empty_like(self.embed)
        counts = torch.empty_like(self.embed[:, 0])
        if _is_rank0():
            found, found_counts = kmeans(z.to(self.embed.dtype), self.codebook_size, self.kmeans_iters, self.chunk_size)
            centroids.copy_(found)
            counts.copy_(found_counts)
        self.embed.copy_(broadcast_from_rank0(centroids))
        if self.ema:  # the running statistics describe the centroids: m_k = N_k e_k
            self.cluster_size.copy_(broadcast_from_rank0(counts).clamp(min=1))
            self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.initted.fill_(True)

    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """N_k <- d N_k + (1-d) n_k;  m_k <- d m_k + (1-d) sum_{z->k} z;  e_k = m_k / N_k' with Laplace-smoothed
        N_k' = (N_k + eps) / (n + K eps) * n, n = sum_k N_k (arXiv 1711.00937, App. A.1)."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    def _restart_dead(self, z: Tensor, counts: Tensor) -> None:
        """Re-seed codes unused for `restart_after` steps with distinct random encoder outputs of this batch: at most
        one code per row of rank 0's batch (more would repeat rows, and of two equal codes one is never nearest),
        the longest unused first; the dead codes left over are restarted at the next steps."""
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)
        rows = int(broadcast_from_rank0(torch.tensor(z.shape[0], device=z.device)))
        dead = dead[torch.argsort(self.steps_unused[dead], descending=True, stable=True)][:rows]
        if dead.numel() == 0:
            return
        fresh = sample_rows(z, dead.numel())
        self.embed.index_copy_(0, dead, fresh)
        self.steps_unused.index_fill_(0, dead, 0)
        if self.ema:  # N_k = 1, m_k = e_k: the restarted code starts where it was put
            self.cluster_size.index_fill_(0, dead, 1.0)
            self.embed_avg.index_copy_(0, dead, fresh)


class SimVQ(Quantizer):
    """SimVQ (arXiv 2411.02038): codebook e = C W^T (+ b), C ~ N(0, 1/D) frozen (a buffer), W one learnable
    nn.Linear, with a bias b as in the official code (`bias`; vector-quantize-pytorch's has none).

    Nearest codes and losses are those of VectorQuantizer; the codebook loss ||sg[z] - C_k W^T - b||^2 trains W and
    b, and because they are shared by every code, each step moves the whole code space, not only the codes a batch
    chose. The bias moves the cloud's centre to the latents' without spending W on it.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 0.25,
        chunk_size: int = 1024,
        rotation_trick: bool = False,
        bias: bool = False,
    ):
        super().__init__(codebook_size, dim, commitment_weight, chunk_size, rotation_trick)
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)  # C
        self.codebook_transform = nn.Linear(dim, dim, bias=bias)  # W, b

    @property
    def codebook(self) -> Tensor:
        return self.codebook_transform(self.frozen_codebook)

    def lookup(self, indices: Tensor) -> Tensor:
        return self.codebook_transform(self.frozen_codebook[indices])  # C_k W^T + b without forming all of C W^T
