"""Shard streaming under DDP: every rank gets its own shards and exactly the same number of full batches."""

from __future__ import annotations

import pytest
import torch

from latentzoo.data.loader import eval_batches, rank_shards, steps_per_epoch, train_batches
from latentzoo.data.shards import load_manifest, shard_urls
from latentzoo.errors import ShardError


def test_rank_shards_partition_the_list_and_agree_across_ranks():
    urls = [f"s{i}.tar" for i in range(7)]
    parts = [rank_shards(urls, r, 3, seed=0, epoch=1) for r in range(3)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
    assert parts == [rank_shards(urls, r, 3, seed=0, epoch=1) for r in range(3)]  # deterministic
    assert parts != [rank_shards(urls, r, 3, seed=0, epoch=2) for r in range(3)]  # reshuffled each epoch


def test_too_few_shards_for_the_workers_is_a_clear_error():
    with pytest.raises(ShardError, match="1 shard\\(s\\) for 2 workers"):
        rank_shards(["only.tar"], 0, 2, seed=0, epoch=0)


@pytest.mark.parametrize("cached", [False, True])
def test_uneven_shards_give_equal_full_batches(digits_shards, node_cache, cached):
    manifest = load_manifest(digits_shards)
    urls = shard_urls(digits_shards, manifest, "train")
    counts = [s["count"] for s in manifest["splits"]["train"]["shards"]]
    assert len(set(counts)) > 1, "fixture should have uneven shards"
    n, world, bs = manifest["splits"]["train"]["count"], 2, 64
    steps = steps_per_epoch(n, world, bs)
    for epoch in range(2):
        for rank in range(world):
            batches = list(
                train_batches(
                    urls,
                    steps=steps,
                    batch_size=bs,
                    rank=rank,
                    world_size=world,
                    seed=0,
                    epoch=epoch,
                    shuffle_buffer=100,
                    cache=node_cache if cached else None,
                )
            )
            assert len(batches) == steps
            assert all(x.shape == (bs, 1, 8, 8) for x, _ in batches)
            assert all(0.0 <= x.min() and x.max() <= 1.0 for x, _ in batches)


@pytest.mark.parametrize("cached", [False, True])
def test_eval_batches_cover_each_sample_once_across_ranks(digits_shards, node_cache, cached):
    manifest = load_manifest(digits_shards)
    urls = shard_urls(digits_shards, manifest, "train")
    labels = [
        y
        for rank in range(2)
        for _, y in eval_batches(urls, batch_size=100, rank=rank, world_size=2, cache=node_cache if cached else None)
    ]
    assert sum(len(y) for y in labels) == manifest["splits"]["train"]["count"]


def test_cached_and_streamed_epochs_hold_the_same_samples(digits_shards, node_cache):
    urls = shard_urls(digits_shards, load_manifest(digits_shards), "train")
    streamed = sorted(int(v) for _, y in eval_batches(urls, batch_size=64) for v in y)
    cached = sorted(int(v) for _, y in eval_batches(urls, batch_size=64, cache=node_cache) for v in y)
    assert streamed == cached
    x, _ = next(cached_epoch(urls, node_cache))
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def cached_epoch(urls, cache):
    return train_batches(urls, steps=3, batch_size=16, rank=0, world_size=1, seed=0, epoch=0, cache=cache)


@pytest.mark.parametrize("shuffle_buffer", [0, 100, 5000])
def test_a_streamed_pass_holds_every_sample_once(digits_shards, shuffle_buffer):
    urls = shard_urls(digits_shards, load_manifest(digits_shards), "train")
    in_order = torch.cat([y for _, y in eval_batches(urls, batch_size=1000)])
    n = len(in_order)
    (x, y), *_ = train_batches(  # one batch of the whole split: the first pass over the rank's shards
        urls, steps=1, batch_size=n, rank=0, world_size=1, seed=0, epoch=0, shuffle_buffer=shuffle_buffer
    )
    assert x.shape[0] == n and sorted(y.tolist()) == sorted(in_order.tolist())
    assert (y != in_order).any()  # shards (and, with a buffer, images) come in a shuffled order
