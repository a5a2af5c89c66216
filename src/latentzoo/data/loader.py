"""Stream WebDataset shards into training and evaluation batches.

Under DDP every rank must run the same number of steps per epoch, or the gradient all-reduce of the rank
with more batches waits forever (webdataset issue 225). So an epoch is a fixed number of full batches,

    steps_per_epoch = ceil(N_train / (world_size * batch_size)),

and each rank streams its own shards — the shard list shuffled with the same seed on every rank, then
rank r takes shards r, r + W, r + 2W, ... (`wds.split_by_node`) — cycling over them until it has that many
batches. Uneven shards only change how often a rank re-reads its own samples, never its step count.

A label budget (fine-tuning with a fraction of the labels) keeps a fixed subset of the training samples, chosen by
a hash of each sample's key (`labelled`), so every rank, epoch and restart agrees on it without any coordination.

When the decoded splits fit in memory (`train.cache_mb`), each worker keeps the shards it has read decoded
(`DecodedShards`) and shuffles them exactly; otherwise every epoch streams the tars again with a shuffle buffer.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image

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


def decode_sample(sample: dict) -> tuple[np.ndarray, int]:
    """One WebDataset sample (PNG bytes + class) → (uint8 array HxWxC, label)."""
    key = sample.get("__key__", "?")
    try:
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        label = int(sample["cls"])
    except Exception as err:  # a corrupt member inside a shard: name the shard and the key
        raise ShardError(f"{sample.get('__url__', 'shard')}: sample {key} is unreadable ({err})") from err
    return (image[..., None] if image.ndim == 2 else image), label


def iter_keyed(
    urls: list[str], shuffle_buffer: int = 0, seed: int = 0, keep=None
) -> Iterator[tuple[str, np.ndarray, int]]:
    """One pass over `urls` in order (optionally shuffled within a buffer): (key, image, label), decoded;
    `keep(key)` selects samples before they are decoded."""
    if not urls:  # a rank with no shard of a small split (val/test) contributes nothing
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    if keep is not None:
        dataset = dataset.select(lambda sample: keep(sample["__key__"]))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, rng=random.Random(seed))
    for sample in dataset:
        yield (sample["__key__"], *decode_sample(sample))


def iter_samples(
    urls: list[str], shuffle_buffer: int = 0, seed: int = 0, keep=None
) -> Iterator[tuple[np.ndarray, int]]:
    """`iter_keyed` without the keys: (image, label)."""
    for _, image, label in iter_keyed(urls, shuffle_buffer, seed, keep):
        yield image, label


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images → float (B, C, H, W) in [0, 1]: what every model takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_batch(images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of uint8 HWC images and their labels → a float batch (`to_float`) and int64 labels."""
    return to_float(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def batched(samples: Iterator[tuple[np.ndarray, int]], batch_size: int, drop_last: bool):
    images, labels = [], []
    for image, label in samples:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield to_batch(images, labels)
            images, labels = [], []
    if images and not drop_last:
        yield to_batch(images, labels)


class DecodedShards:
    """Shards decoded once and kept in this process's memory (a per-worker cache).

    WebDataset still reads every shard from disk once; afterwards an epoch costs no tar parsing or PNG decoding,
    which on CPU is otherwise about a quarter of an MNIST epoch. Used only when the splits fit `train.cache_mb`.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    def get(self, url: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if url not in self._arrays:
            samples = list(iter_keyed([url]))
            if not samples:
                raise ShardError(f"{url}: holds no samples")
            keys, images, labels = zip(*samples)
            self._arrays[url] = np.stack(images), np.asarray(labels, dtype=np.int64), list(keys)
        return self._arrays[url]

    def concat(self, urls: list[str], keep=None) -> tuple[np.ndarray, np.ndarray]:
        """The decoded samples of `urls` in order; `keep(key)` filters."""
        parts = [self.get(u) for u in urls]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if keep is None:
            return images, labels
        mask = np.array([keep(key) for p in parts for key in p[2]], dtype=bool)
        return images[mask], labels[mask]


CACHE = DecodedShards()  # one per process: each Ray Train worker fills its own


def decoded_bytes(count: int, image_shape) -> int:
    """Memory the decoded uint8 images of a split take."""
    return count * math.prod(image_shape)


def array_batch(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return to_float(images), torch.from_numpy(labels)


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
    cached: bool = False,
    label_fraction: float = 1.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly `steps` full batches for this rank and epoch, cycling over the rank's shards as needed.

    cached: shuffle the rank's decoded samples exactly (in memory); else stream the shards through WebDataset
    with a shuffle buffer. label_fraction < 1: only the samples in the label budget (`labelled`).
    """
    mine = rank_shards(urls, rank, world_size, seed, epoch)
    keep = None if label_fraction >= 1 else (lambda key: labelled(key, label_fraction, seed))
    if cached:
        return cached_batches(mine, steps, batch_size, np.random.default_rng((seed, epoch, rank)), keep)

    def endless() -> Iterator[tuple[np.ndarray, int]]:
        for cycle in range(1_000_000):
            seen = 0
            for sample in iter_samples(mine, shuffle_buffer, seed=hash((seed, epoch, rank, cycle)), keep=keep):
                seen += 1
                yield sample
            if seen == 0:
                raise ShardError(f"shards {mine} hold no samples")

    return islice(batched(endless(), batch_size, drop_last=True), steps)


def cached_batches(urls: list[str], steps: int, batch_size: int, rng: np.random.Generator, keep=None):
    """`steps` batches from successive random permutations of the decoded samples of `urls` (`keep` filters)."""
    images, labels = CACHE.concat(urls, keep)
    if len(images) == 0:
        raise ShardError(f"shards {urls} hold no samples in the label budget; raise finetune.label_fraction")
    passes = math.ceil(steps * batch_size / len(images))
    order = np.concatenate([rng.permutation(len(images)) for _ in range(passes)])
    for step in range(steps):
        idx = np.sort(order[step * batch_size : (step + 1) * batch_size])  # sorted: faster gathers
        yield array_batch(images[idx], labels[idx])


def eval_batches(
    urls: list[str], *, batch_size: int, rank: int = 0, world_size: int = 1, cached: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass over this rank's share of the shards (every sample exactly once across ranks)."""
    mine = list(islice(urls, rank, None, world_size))
    if not cached:
        return batched(iter_samples(mine), batch_size, drop_last=False)
    if not mine:
        return iter(())
    images, labels = CACHE.concat(mine)
    return (
        array_batch(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)
    )
