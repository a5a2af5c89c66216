"""The node cache: decoded shards written once per node into arrays every worker there maps."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from latentzoo.data import cache
from latentzoo.data.loader import decode_shard, iter_blocks
from latentzoo.data.shards import load_manifest, shard_urls
from latentzoo.errors import ShardError


@pytest.fixture
def urls(digits_shards):
    return shard_urls(digits_shards, load_manifest(digits_shards), "train")


def another_worker():
    """What a second process on the node starts with: none of this process's maps."""
    cache._OPEN.clear()


def refuse(url):
    raise AssertionError(f"{url} decoded a second time")


def decoded(url):
    blocks = list(iter_blocks([url]))
    return np.concatenate([b.images for b in blocks]), np.concatenate([b.labels for b in blocks])


def test_a_shard_is_decoded_once_per_node_and_mapped_by_every_worker(urls, node_cache):
    first = node_cache.samples(urls[1:2], decode_shard)
    another_worker()
    second = node_cache.samples(urls[1:2], refuse)  # found in the node's files: not decoded again
    assert isinstance(second.images, np.memmap) and second.images.filename == first.images.filename  # same pages
    images, labels = decoded(urls[1])
    got_images, got_labels = second.take(np.arange(len(second)))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable and not np.shares_memory(got_images, second.images)  # a batch is a copy
    assert sorted(p.name for p in node_cache.folder().iterdir() if p.suffix == ".npy") == [
        "images.npy",
        "index.npy",
        "labels.npy",
    ]  # one array for all the shards, no temporary files left


def test_samples_follow_the_urls_order_and_the_label_budget(urls, node_cache):
    keep = lambda key: int(key[-1]) % 3 != 0  # noqa: E731
    order = [urls[2], urls[0]]
    samples = node_cache.samples(order, decode_shard, keep)
    expected = [
        (b.images[i], b.labels[i]) for u in order for b in iter_blocks([u]) for i, k in enumerate(b.keys) if keep(k)
    ]
    positions = np.sort(np.random.default_rng(0).choice(len(samples), 100, replace=False))
    assert len(samples) == len(expected)
    got_images, got_labels = samples.take(positions)
    np.testing.assert_array_equal(got_images, np.stack([expected[p][0] for p in positions]))
    np.testing.assert_array_equal(got_labels, [expected[p][1] for p in positions])


def test_clearing_keeps_open_maps_readable_and_the_next_read_decodes_again(urls, node_cache):
    before = node_cache.samples(urls[:1], decode_shard)
    folder = node_cache.folder()
    node_cache.clear()
    assert not folder.exists()
    assert int(before.take(np.arange(len(before)))[0].sum()) > 0  # the mapped pages outlive the files
    again = node_cache.samples(urls[:1], decode_shard)
    np.testing.assert_array_equal(again.take(np.arange(len(again)))[1], before.take(np.arange(len(before)))[1])


def test_a_worker_whose_cache_folder_cannot_be_written_keeps_its_own_copy(urls, node_cache, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr(cache, "bases", lambda: [blocked])
    samples = node_cache.samples(urls[:1], decode_shard)
    assert not isinstance(samples.images, np.memmap) and len(samples) == 500
    np.testing.assert_array_equal(samples.take(np.arange(500))[1], decoded(urls[0])[1])


def test_a_shard_whose_count_differs_from_the_manifest_is_named(urls, node_cache):
    def short(url):
        full = decode_shard(url)
        return cache.Decoded(full.images[:-1], full.labels[:-1], full.keys[:-1])

    with pytest.raises(ShardError, match=f"{urls[0]}: 499 samples where the manifest says 500"):
        node_cache.samples(urls[:1], short)


def test_the_cache_folder_is_the_environments_when_set_else_shared_memory_or_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "fast-disk"))
    node = cache.NodeCache.of("ab" * 32, [("shard-0.tar", 10)], size_bytes=10**15)  # too big for /dev/shm
    assert node.folder() == tmp_path / "fast-disk" / node.name
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    assert cache.bases()[-1] == Path(tempfile.gettempdir()) and node.folder().parent == Path(tempfile.gettempdir())
