"""Stream WebDataset shards into training and evaluation batches.

Under DDP every rank must run the same number of steps per epoch, or the gradient all-reduce of the rank
with more batches waits forever (webdataset issue 225). So an epoch is a fixed number of full batches,

    steps_per_epoch = ceil(N_train / (world_size * batch_size)),

and each rank streams its own shards — the shard list shuffled with the same seed on every rank, then
rank r takes shards r, r + W, r + 2W, ... (`wds.split_by_node`) — cycling over them until it has that many
batches. Uneven shards only change how often a rank re-reads its own samples, never its step count.

A label budget (fine-tuning with a fraction of the labels) keeps a fixed subset of the training samples, chosen by
a hash of each sample's key (`labelled`), so every rank, epoch and restart agrees on it without any coordination.

Shards hold blocks of raw uint8 images (`latentzoo.data.shards`), so reading is array work, not per-image Python:
streamed, an epoch gathers consecutive blocks into a shuffle buffer and permutes it (`shuffled_chunks`). When the
splits fit in memory (`train.cache_mb`), the shards are decoded once per node into files every worker there maps
(`latentzoo.data.cache`), and an epoch shuffles them exactly instead.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import webdataset as wds

from latentzoo.data.cache import Decoded, NodeCache, Samples
from latentzoo.data.shards import sample_key
from latentzoo.errors import ShardError


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches per rank per epoch: every sample is seen about once across all ranks."""
    return max(1, math.ceil(num_samples / (world_size * batch_size)))


def rank_shards(urls: list[str], rank: int, world_size: int, seed: int, epoch: int) -> list[str]:
    """This rank's shards for this epoch: one shared shuffle (seed + epoch), then every world_size-th shard.

    Equivalent to shuffling before `wds.split_by_node`, with the rank passed in explicitly so local mode and
    tests can drive it without a process group.
    """
    if len(urls) < world_size:
        raise ShardError(
            f"{len(urls)} shard(s) for {world_size} workers: every worker needs at least one shard; "
            f"lower shard.maxcount or train.num_workers"
        )
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return list(islice(order, rank, None, world_size))


def labelled(key: str, fraction: float, seed: int) -> bool:
    """Is sample `key` in the label budget? u = sha256(seed, key) as a number in [0, 1); kept when u < fraction."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def count_labelled(split: str, count: int, fraction: float, seed: int) -> int:
    """How many of the `count` samples of `split` the label budget keeps (exactly, from their keys)."""

    return sum(labelled(sample_key(split, i), fraction, seed) for i in range(count))


@dataclass(frozen=True)
class Block:
    """Consecutive images of one split, as one shard member holds them: uint8 N×H×W×C images, int64 labels,
    and the key of each (`sample_key`)."""

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep) -> Block:
        """The images whose key `keep(key)` accepts."""
        mask = np.fromiter((keep(k) for k in self.keys), dtype=bool, count=len(self.keys))
        return Block([k for k, m in zip(self.keys, mask) if m], self.images[mask], self.labels[mask])


def read_block(sample: dict) -> Block:
    """One WebDataset sample of a shard (`<key>.images.npy`, `<key>.labels.npy`) → a Block; a ShardError naming
    the shard and the block when a member is missing, unreadable or inconsistent."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "shard")
    try:
        images = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
        labels = np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False)
        split, _, first = key.rpartition("-")
        if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"images {images.dtype} {images.shape} with labels {labels.shape}")
        keys = [sample_key(split, int(first) + i) for i in range(len(labels))]
    except Exception as err:  # a corrupt member inside a shard: name the shard and the block
        raise ShardError(f"{url}: block {key} is unreadable ({type(err).__name__}: {err})") from err
    return Block(keys, images, labels.astype(np.int64, copy=False))


def iter_blocks(urls: list[str], keep=None) -> Iterator[Block]:
    """The blocks of `urls` in order; `keep(key)` selects images (empty blocks are skipped)."""
    if not urls:  # a rank with no shard of a small split (val/test) contributes nothing
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in dataset:
        block = read_block(sample)
        if keep is not None:
            block = block.select(keep)
        if len(block):
            yield block


def iter_keyed(urls: list[str], keep=None) -> Iterator[tuple[str, np.ndarray, int]]:
    """One ordered pass over `urls`, image by image: (key, uint8 HxWxC image, label)."""
    for block in iter_blocks(urls, keep):
        yield from zip(block.keys, block.images, block.labels.tolist())


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images → float (B, C, H, W) in [0, 1]: what every model takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def array_batch(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return to_float(images), torch.from_numpy(labels)


def rebatch(chunks: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, drop_last: bool):
    """(images, labels) arrays of any lengths → batches of exactly `batch_size` (the last one shorter unless
    `drop_last`), in order."""
    images, labels = np.empty((0,), np.uint8), np.empty((0,), np.int64)
    for chunk_images, chunk_labels in chunks:
        images = np.concatenate([images, chunk_images]) if len(images) else chunk_images
        labels = np.concatenate([labels, chunk_labels]) if len(labels) else chunk_labels
        full = len(labels) - len(labels) % batch_size
        for i in range(0, full, batch_size):
            yield array_batch(images[i : i + batch_size], labels[i : i + batch_size])
        images, labels = images[full:], labels[full:]
    if len(labels) and not drop_last:
        yield array_batch(images, labels)


def arrays_of(blocks: Iterator[Block]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return ((b.images, b.labels) for b in blocks)


def shuffled_chunks(blocks: Iterator[Block], buffer: int, rng: np.random.Generator):
    """Consecutive blocks gathered until they hold at least `buffer` images, then permuted: a shuffle buffer that
    moves arrays, not images one by one (the shard order is shuffled too, by `rank_shards`)."""
    pending: list[Block] = []
    for block in blocks:
        pending.append(block)
        if sum(len(b) for b in pending) >= buffer:
            yield permuted(pending, rng)
            pending = []
    if pending:
        yield permuted(pending, rng)


def permuted(blocks: list[Block], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([b.images for b in blocks])
    labels = np.concatenate([b.labels for b in blocks])
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def decode_shard(url: str) -> Decoded:
    """All the samples of shard `url`, as the node cache keeps them."""
    blocks = list(iter_blocks([url]))
    if not blocks:
        raise ShardError(f"{url}: holds no samples")
    images, labels = np.concatenate([b.images for b in blocks]), np.concatenate([b.labels for b in blocks])
    return Decoded(images, labels, [k for b in blocks for k in b.keys])


def decoded_bytes(count: int, image_shape) -> int:
    """Memory the decoded uint8 images of a split take."""
    return count * math.prod(image_shape)


def train_batches(
    urls: list[str],
    *,
    steps: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 1000,
    cache: NodeCache | None = None,
    label_fraction: float = 1.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly `steps` full batches for this rank and epoch, cycling over the rank's shards as needed.

    cache: shuffle the rank's decoded samples (kept in this node's `cache`) exactly; else stream the shards' blocks
    through a shuffle buffer of `shuffle_buffer` images (`shuffled_chunks`; 0 or 1: in order). label_fraction < 1: only
    the samples in the label budget (`labelled`).
    """
    mine = rank_shards(urls, rank, world_size, seed, epoch)
    keep = None if label_fraction >= 1 else (lambda key: labelled(key, label_fraction, seed))
    if cache is not None:
        return cached_batches(
            cache.samples(mine, decode_shard, keep), steps, batch_size, np.random.default_rng((seed, epoch, rank))
        )

    rng = np.random.default_rng((seed, epoch, rank))

    def endless() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            seen = 0
            blocks = iter_blocks(mine, keep)
            chunks = shuffled_chunks(blocks, shuffle_buffer, rng) if shuffle_buffer > 1 else arrays_of(blocks)
            for chunk in chunks:
                seen += len(chunk[1])
                yield chunk
            if seen == 0:
                raise ShardError(f"shards {mine} hold no samples")

    return islice(rebatch(endless(), batch_size, drop_last=True), steps)


def cached_batches(samples: Samples, steps: int, batch_size: int, rng: np.random.Generator):
    """`steps` batches from successive random permutations of the decoded `samples`."""
    if len(samples) == 0:
        raise ShardError("this rank's shards hold no samples in the label budget; raise finetune.label_fraction")
    passes = math.ceil(steps * batch_size / len(samples))
    order = np.concatenate([rng.permutation(len(samples)) for _ in range(passes)])
    for step in range(steps):
        idx = np.sort(order[step * batch_size : (step + 1) * batch_size])  # sorted: faster gathers
        yield array_batch(*samples.take(idx))


def eval_batches(
    urls: list[str], *, batch_size: int, rank: int = 0, world_size: int = 1, cache: NodeCache | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass over this rank's share of the shards (every sample exactly once across ranks)."""
    mine = list(islice(urls, rank, None, world_size))
    if cache is None:
        return rebatch(arrays_of(iter_blocks(mine)), batch_size, drop_last=False)
    samples = cache.samples(mine, decode_shard)
    return (
        array_batch(*samples.take(np.arange(i, min(i + batch_size, len(samples)))))
        for i in range(0, len(samples), batch_size)
    )
