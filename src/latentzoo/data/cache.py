"""Decoded shards kept once per node and shared by every worker there (`train.cache_mb`).

When the decoded train and val splits fit the budget, each node holds one array of all their images (and one of
labels, one of sample indices) in ``.npy`` files that every worker on the node maps (``np.lib.format.open_memmap``).
Shard s owns rows [start_s, start_s + count_s) in manifest order. The first worker on the node to need a shard
decodes it, writes its rows and then a marker file; afterwards every worker there reads those rows from the map.
The pages are the kernel's, so W workers of one node hold one copy, not W, and a worker restarted after a failure
finds the shards already decoded. A batch is one gather from one array (`Samples.take`). The folder is

    /dev/shm/<name>   (memory) when it has room for the splits, else <tempdir>/<name> (the page cache),

or $LATENTZOO_CACHE_DIR/<name> when that is set (e.g. a fast local disk, or a folder of one's own; on every node),

with `name` the same on every node (`NodeCache`); the driver removes it on every node when the run ends
(`latentzoo.training.cluster.clear_node_caches`). The files are created under temporary names and linked into
place (never replaced), and two workers decoding the same shard at once write the same bytes; a removal while a
worker reads costs time, never a wrong sample (its maps stay valid; missing markers mean decoding again).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentzoo.data.shards import sample_key
from latentzoo.errors import ShardError

SHM = Path("/dev/shm")
CACHE_DIR_ENV = "LATENTZOO_CACHE_DIR"  # where node caches go instead of /dev/shm or the temp dir
ROOM = 1.25  # /dev/shm is used when its free space is at least this many times the decoded splits


@dataclass(frozen=True)
class Decoded:
    """One shard's samples: uint8 N×H×W×C images, int64 labels and each sample's key ('train-0000042')."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str]


@dataclass(frozen=True)
class Samples:
    """Some rows of a node cache's arrays (`rows`, in order), read as one sequence."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels at `positions` (a copy of those rows only)."""
        picked = self.rows[positions]
        return self.images[picked], self.labels[picked]


@dataclass
class _Arrays:
    """This process's view of one node cache: the mapped arrays and the shards it knows are in them."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray  # each row's sample index in its split
    splits: dict[str, str] = field(default_factory=dict)  # url → split, for the shards known to be written


@dataclass(frozen=True)
class NodeCache:
    """The decoded shards of one dataset on each node: `name` (the same on every node), the shards it holds with
    their sample counts (manifest order: train, then val) and their decoded size, which decides the folder."""

    name: str
    shards: tuple[tuple[str, int], ...]
    size_bytes: int

    @classmethod
    def of(cls, manifest_sha: str, shards: list[tuple[str, int]], size_bytes: int) -> NodeCache:
        return cls(f"latentzoo-cache-{manifest_sha[:16]}", tuple(shards), size_bytes)

    def folder(self) -> Path:
        """This node's folder: an existing one (another worker chose), else /dev/shm when it has room."""
        candidates = [base / self.name for base in bases()]
        for folder in candidates:
            if folder.is_dir():
                return folder
        roomy = SHM.is_dir() and shutil.disk_usage(SHM).free >= ROOM * self.size_bytes
        return candidates[0] if roomy else candidates[-1]

    def samples(self, urls: list[str], decode: Callable[[str], Decoded], keep=None) -> Samples:
        """The samples of `urls` in order, decoding into the cache the shards no worker here has yet; `keep(key)`
        selects samples."""
        starts = self._starts()
        arrays = None
        for url in urls:
            arrays = self._ensure(url, decode, starts)
        if arrays is None:
            return Samples(np.empty((0,), np.uint8), np.empty((0,), np.int64), np.empty((0,), np.int64))
        rows = []
        for url in urls:
            start, count = starts[url]
            mine = np.arange(start, start + count)
            if keep is not None:
                split = arrays.splits[url]
                mine = mine[[keep(sample_key(split, i)) for i in arrays.index[mine].tolist()]]
            rows.append(mine)
        return Samples(arrays.images, arrays.labels, np.concatenate(rows))

    def clear(self) -> None:
        """Remove this node's folder (workers that still map the files keep reading them; new reads decode again)."""
        for base in bases():
            shutil.rmtree(base / self.name, ignore_errors=True)
        _OPEN.pop(self.name, None)

    def _starts(self) -> dict[str, tuple[int, int]]:
        offsets = np.cumsum([0] + [count for _, count in self.shards])
        return {url: (int(offsets[i]), count) for i, (url, count) in enumerate(self.shards)}

    def _ensure(self, url: str, decode: Callable[[str], Decoded], starts) -> _Arrays:
        """This process's arrays, with shard `url`'s rows written (by this worker now, or by any worker before)."""
        if url not in starts:
            raise ShardError(f"{url}: not one of the shards of node cache {self.name}")
        arrays = _OPEN.get(self.name)
        if arrays is not None and url in arrays.splits:
            return arrays
        folder = self.folder()
        marker = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.done"
        if arrays is None and marker.exists():
            arrays = _open(folder)
        if arrays is not None and marker.exists():
            arrays.splits[url] = marker.read_text()
            _OPEN[self.name] = arrays
            return arrays
        decoded = decode(url)
        start, count = starts[url]
        if len(decoded.labels) != count:
            raise ShardError(f"{url}: {len(decoded.labels)} samples where the manifest says {count}")
        total = sum(c for _, c in self.shards)
        arrays = arrays or _create(folder, total, decoded.images.shape[1:]) or _private(total, decoded.images.shape[1:])
        split = decoded.keys[0].rpartition("-")[0]
        arrays.images[start : start + count] = decoded.images
        arrays.labels[start : start + count] = decoded.labels
        arrays.index[start : start + count] = [int(k.rpartition("-")[2]) for k in decoded.keys]
        arrays.splits[url] = split
        _OPEN[self.name] = arrays
        try:
            marker.write_text(split)  # after the rows: a worker that sees it reads complete rows
        except OSError:  # the folder went away (the run ended elsewhere) or is private to this process
            pass
        return arrays


_OPEN: dict[str, _Arrays] = {}  # this process's maps, by cache name
_MEMBERS = ("images", "labels", "index")


def bases() -> list[Path]:
    """The folders a node cache may live in, in order of preference."""
    if os.environ.get(CACHE_DIR_ENV):
        return [Path(os.environ[CACHE_DIR_ENV])]
    return [SHM, Path(tempfile.gettempdir())] if SHM.is_dir() else [Path(tempfile.gettempdir())]


def _open(folder: Path) -> _Arrays | None:
    """The node's arrays mapped read-write (this worker may fill shards in), or None if they are not there."""
    try:
        return _Arrays(*(np.lib.format.open_memmap(folder / f"{m}.npy", mode="r+") for m in _MEMBERS))
    except OSError:
        return None


def _create(folder: Path, total: int, image_shape: tuple[int, ...]) -> _Arrays | None:
    """The node's arrays, created empty (sparse files) unless a worker did first; None if the folder cannot hold
    them. Each file is made under a temporary name and hard-linked into place, so none is ever replaced."""
    layout = {
        "images": (np.uint8, (total, *image_shape)),
        "labels": (np.int64, (total,)),
        "index": (np.int64, (total,)),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for member, (dtype, shape) in layout.items():
            final = folder / f"{member}.npy"
            if final.exists():
                continue
            fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{member}-", suffix=".npy")
            os.close(fd)
            try:
                np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=shape).flush()
                os.link(temp, final)
            except FileExistsError:  # another worker linked its file first
                pass
            finally:
                os.unlink(temp)
    except OSError:
        return None
    return _open(folder)


def _private(total: int, image_shape: tuple[int, ...]) -> _Arrays:
    """Arrays in this process only, for a node whose cache folder cannot be written (pages used as rows fill)."""
    return _Arrays(np.empty((total, *image_shape), np.uint8), np.empty(total, np.int64), np.empty(total, np.int64))
