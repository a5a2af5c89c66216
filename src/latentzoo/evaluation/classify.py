"""Held-out figures of the stacked autoencoder: classification accuracy and each layer's reconstruction error.

accuracy      = mean_i [argmax_c logits_c(x_i) = y_i]                      over the test split
recon_mse(k)  = mean_i mean_j (ĥ_{k-1}(x_i)_j - h_{k-1}(x_i)_j)²         layer k on clean inputs, h_0 = x
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentzoo.data.loader import eval_batches
from latentzoo.data.shards import checked_shards


def test_urls(shard_dir: Path) -> list[str]:
    """The test split's shards, checked against the manifest's sha256 first."""
    return checked_shards(shard_dir, ("test",))[1]["test"]


@torch.no_grad()
def accuracy(model, urls: list[str], batch_size: int) -> float:
    """Fraction of the images in `urls` whose top class is their label."""
    model.eval()
    correct = count = 0
    for x, y in eval_batches(urls, batch_size=batch_size):
        correct += int((model(x).logits.argmax(dim=1) == y).sum())
        count += len(y)
    return correct / max(count, 1)


@torch.no_grad()
def layer_errors(model, urls: list[str], batch_size: int) -> dict[str, float]:
    """{"recon_mse_layer<k>": mean squared error of layer k's autoencoder on clean inputs} for k = 1..L."""
    model.eval()
    sums = [0.0] * model.num_layers
    count = 0
    for x, _ in eval_batches(urls, batch_size=batch_size):
        for k in range(1, model.num_layers + 1):
            sums[k - 1] += float(model.layer_error(x, k).sum())
        count += len(x)
    return {f"recon_mse_layer{k + 1}": s / max(count, 1) for k, s in enumerate(sums)}
