"""Vector quantiser of VQ-VAE, van den Oord et al., "Neural Discrete Representation Learning", arXiv 1711.00937.

Each encoder output z_e(x) in R^D is replaced by its nearest codebook vector,

    k = argmin_j ||z_e(x) - e_j||^2,    z_q(x) = e_k,

and the decoder's gradient is copied straight through to z_e (z_q = z_e + sg[e_k - z_e]). Training adds

    L = ||sg[z_e] - e||^2  (codebook)  +  beta ||z_e - sg[e]||^2  (commitment),

or, with `ema=True`, drops the codebook term and moves each e_k to the running mean of the z_e assigned to it
(arXiv 1711.00937, App. A.1). Codes unused for `restart_after` steps are re-seeded from the batch's z_e.
Under torch.distributed the code statistics are summed over ranks and the re-seeded vectors are broadcast
from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------- nearest code


@torch.no_grad()
def nearest_codes(z: Tensor, codebook: Tensor, chunk_size: int = 1024) -> Tensor:
    """Indices (N,) int64 of argmin_j ||z_i - e_j||^2 for z (N, D) and codebook (K, D).

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 is computed for `chunk_size` codes at a time, keeping a running
    (best distance, best index) per row, so at most an N x chunk_size distance matrix exists at once.
    Ties go to the lowest index, as in torch.argmin.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    z_sq = z.pow(2).sum(dim=1, keepdim=True)  # (N, 1)
    best = torch.full((z.shape[0],), math.inf, device=z.device, dtype=z.dtype)
    best_idx = torch.zeros(z.shape[0], device=z.device, dtype=torch.long)
    for start in range(0, codebook.shape[0], chunk_size):
        chunk = codebook[start : start + chunk_size]
        dist_sq = torch.addmm(chunk.pow(2).sum(dim=1)[None], z, chunk.t(), alpha=-2).add_(z_sq)  # (N, chunk)
        chunk_best, chunk_idx = dist_sq.min(dim=1)
        better = chunk_best < best  # strict: an earlier chunk keeps ties
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return best_idx


def codebook_usage(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of a codebook by `indices` (any shape): fraction of codes used, perplexity exp(H(p)) of the code
    histogram p (K means uniform over all codes), and the number of unused ("dead") codes."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "utilisation": used / codebook_size,
        "perplexity": float(entropy.exp()),
        "dead_codes": float(codebook_size - used),
    }


# ---------------------------------------------------------------- distributed helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (identity outside torch.distributed)."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(t: Tensor) -> Tensor:
    """Overwrite `t` on every rank with rank 0's `t`, in place (identity outside torch.distributed)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


# ---------------------------------------------------------------- update rules


def code_stats(z: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per-code counts n_k (K,) and sums sum_{z -> k} z (K, D), summed over ranks in a single all-reduce."""
    stats = torch.zeros(codebook_size, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    stats.index_add_(0, indices, torch.cat([torch.ones_like(z[:, :1]), z], dim=1))
    all_reduce_sum(stats)
    return stats[:, 0], stats[:, 1:]


def sample_rows(z: Tensor, n: int) -> Tensor:
    """n rows of z (n, D), chosen at random on rank 0 and broadcast, identical on every rank."""
    out = torch.empty(n, z.shape[1], device=z.device, dtype=z.dtype)
    if _is_rank0():
        if n <= z.shape[0]:
            pick = torch.randperm(z.shape[0], device=z.device)[:n]
        else:  # fewer rows than dead codes: draw with replacement
            pick = torch.randint(z.shape[0], (n,), device=z.device)
        out.copy_(z[pick])
    return broadcast_from_rank0(out)


# ---------------------------------------------------------------- module


class VectorQuantizer(nn.Module):
    """z (B, D, H, W) or (N, D) → (z_q straight-through, indices (B, H, W) or (N,), losses).

    losses["commitment"] = commitment_weight * mean ||z - sg[e]||^2 always; losses["codebook"] =
    mean ||sg[z] - e||^2 only when ema=False (with ema=True the codebook is a buffer updated in training mode).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_after: int = 0,
        chunk_size: int = 1024,
    ):
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_weight, self.ema, self.decay, self.eps = commitment_weight, ema, decay, eps
        self.restart_after, self.chunk_size = restart_after, chunk_size
        init = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("embed", init)
            # N_k = 1 and m_k = e_k: e_k = m_k / N_k starts at the initial codebook (App. A.1 leaves it open)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", init.clone())
        else:
            self.embed = nn.Parameter(init)
        if restart_after > 0:
            self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    @property
    def codebook(self) -> Tensor:
        """The codebook e (K, D)."""
        return self.embed

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        flat = self._flatten(z)
        indices = nearest_codes(flat.detach(), self.embed.detach(), self.chunk_size)
        q = F.embedding(indices, self.embed)  # gradient reaches a Parameter codebook only through this
        losses = {"commitment": self.commitment_weight * F.mse_loss(flat, q.detach())}
        if not self.ema:
            losses["codebook"] = F.mse_loss(flat.detach(), q)
        if self.training and (self.ema or self.restart_after > 0):
            self._update(flat.detach(), indices)
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

    # ------------------------------------------------------------ training-time codebook updates

    @torch.no_grad()
    def _update(self, z: Tensor, indices: Tensor) -> None:
        counts, sums = code_stats(z.to(self.embed.dtype), indices, self.codebook_size)
        if self.ema:
            self._ema_update(counts, sums)
        if self.restart_after > 0:
            self._restart_dead(z.to(self.embed.dtype), counts)

    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """N_k <- d N_k + (1-d) n_k;  m_k <- d m_k + (1-d) sum_{z->k} z;  e_k = m_k / N_k' with Laplace-smoothed
        N_k' = (N_k + eps) / (n + K eps) * n, n = sum_k N_k (arXiv 1711.00937, App. A.1)."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    def _restart_dead(self, z: Tensor, counts: Tensor) -> None:
        """Re-seed codes unused for `restart_after` steps with random encoder outputs of this batch."""
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        fresh = sample_rows(z, dead.numel())
        self.embed.index_copy_(0, dead, fresh)
        self.steps_unused.index_fill_(0, dead, 0)
        if self.ema:  # N_k = 1, m_k = e_k: the restarted code starts where it was put
            self.cluster_size.index_fill_(0, dead, 1.0)
            self.embed_avg.index_copy_(0, dead, fresh)
