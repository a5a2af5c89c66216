"""The shard stage's work: prepared .npz splits → WebDataset tar shards, plus a manifest with their checksums.

A WebDataset sample here is a *block* of consecutive images, not one image: ``<key>.images.npy`` (uint8,
N×H×W×C) and ``<key>.labels.npy`` (int64, N), where ``<key>`` is the block's first image's key
(``train-0000042``; image i of the block is ``train-<42 + i>``). A block holds up to `BLOCK_BYTES` of pixels
(1,024 MNIST digits, 85 RGB images of 64×64). Raw arrays cost nothing to decode and one tar member per thousand
images costs next to nothing to parse, so streaming an epoch from the shards runs at in-memory speed, where one
PNG member per image ran at 0.03× (`benchmarks/loader_speed.py`). Any WebDataset reader still reads them
(`.decode()` turns ``.npy`` members into arrays); `latentzoo.data.loader` does.

Shards are byte-identical for identical input (fixed tar mtime and owner), hold `maxcount` images each (the last
fewer), and `manifest.json` records each shard's image count and sha256 so training can refuse a shard that
changed on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.data.prepare import SPLITS, load_split
from latentzoo.errors import DataError, ShardError

MANIFEST = "manifest.json"
FORMAT = 2  # 1: one PNG per image
BLOCK_BYTES = 1 << 20  # pixels per block (one tar member of images)
MAX_BLOCK = 1024  # images per block at most
_REPRO_HINT = "re-run the shard stage (dvc repro shard)"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def block_size(image_shape) -> int:
    """Images per block for images of `image_shape`: up to BLOCK_BYTES of pixels, at least 1, at most MAX_BLOCK."""
    return max(1, min(MAX_BLOCK, BLOCK_BYTES // math.prod(image_shape)))


def encode_array(array: np.ndarray) -> bytes:
    """An array as .npy bytes (no pickle; deterministic)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def sample_key(split: str, index: int) -> str:
    """The key of image `index` of `split`: 'train-0000042' (a block's key is its first image's)."""
    return f"{split}-{index:07d}"


def _write_shard(path: Path, split: str, images: np.ndarray, labels: np.ndarray, first: int, bar: tqdm) -> dict:
    """Images [first, first + len(images)) of `split` as one tar of blocks; its manifest entry."""
    per_block = block_size(images.shape[1:])
    # mtime=0 and fixed user/group: TarWriter otherwise stamps time.time(), making every run's bytes differ.
    with wds.TarWriter(str(path), mtime=0, user="latentzoo", group="latentzoo") as writer:
        for start in range(0, len(images), per_block):
            block = slice(start, start + per_block)
            writer.write(
                {
                    "__key__": sample_key(split, first + start),
                    "images.npy": encode_array(images[block]),
                    "labels.npy": encode_array(labels[block].astype(np.int64)),
                }
            )
            bar.update(len(labels[block]))
    return {"name": path.name, "count": len(images), "sha256": sha256_file(path)}


def _write_split(tmp: Path, split: str, images: np.ndarray, labels: np.ndarray, maxcount: int, bar: tqdm) -> dict:
    """Write one split as `<split>-000000.tar`, ... (maxcount images each) into `tmp`; its manifest entry."""
    shards = [
        _write_shard(tmp / f"{split}-{k:06d}.tar", split, images[i : i + maxcount], labels[i : i + maxcount], i, bar)
        for k, i in enumerate(range(0, len(labels), maxcount))
    ]
    return {"count": len(labels), "shards": shards}


def write_shards(prepared_dir: Path, out_dir: Path, maxcount: int, progress: bool = True) -> dict:
    """Shard every split of `prepared_dir` into `out_dir` (atomically: manifest last, then one rename).

    Returns the manifest: format, image_shape, classes, num_classes, prepared (sha256 of prepare.json), maxcount,
    skipped (the source files prepare left out), splits {split: {"count", "shards": [{"name", "count", "sha256"}]}}.
    """
    prepared_dir = Path(prepared_dir)
    info_path = prepared_dir / "prepare.json"
    try:
        info_bytes = info_path.read_bytes()
        info = json.loads(info_bytes)
    except FileNotFoundError:
        raise DataError(f"{info_path}: not found; run the prepare stage (dvc repro prepare)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{info_path}: unreadable ({exc}); re-run dvc repro prepare") from None
    sets = {split: load_split(prepared_dir, split) for split in SPLITS}
    for split, s in sets.items():
        if len(s) == 0:
            raise DataError(f"{prepared_dir / split}.npz: empty split; re-run dvc repro prepare")
    manifest = {
        "format": FORMAT,
        "image_shape": info["image_shape"],
        "classes": info["classes"],
        "num_classes": info["num_classes"],
        "prepared": hashlib.sha256(info_bytes).hexdigest(),
        "maxcount": maxcount,
        "skipped": info.get("skipped", {"count": 0, "files": []}),  # files prepare left out (on_error: skip)
        "splits": {},
    }
    total = sum(len(s) for s in sets.values())
    bar = tqdm(total=total, desc="shard", unit="img", mininterval=1.0, disable=not progress)
    with atomic_dir(out_dir) as tmp, bar:
        for split, s in sets.items():
            manifest["splits"][split] = _write_split(tmp, split, s.images, s.labels, maxcount, bar)
        (tmp / MANIFEST).write_text(json_text(manifest))
    return manifest


def load_manifest(shard_dir: Path) -> dict:
    """Read `<shard_dir>/manifest.json`; ShardError naming it when missing, unreadable or not a manifest."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: shard manifest not found; run the shard stage (dvc repro shard)") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable shard manifest ({exc}); {_REPRO_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise ShardError(f"{path}: not a format-{FORMAT} shard manifest; {_REPRO_HINT}")
    return manifest


def _split_entry(shard_dir: Path, manifest: dict, split: str) -> dict:
    """The manifest's entry for `split`; ShardError when it has none."""
    try:
        return manifest["splits"][split]
    except KeyError:
        known = ", ".join(manifest["splits"])
        raise ShardError(f"{Path(shard_dir) / MANIFEST}: no split {split!r} (has {known})") from None


def verify_shards(shard_dir: Path, manifest: dict | None = None, splits=None) -> None:
    """Check every shard of `splits` (default: all) exists and matches its manifest sha256; ShardError if not."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir) if manifest is None else manifest
    for split in manifest["splits"] if splits is None else splits:
        for shard in _split_entry(shard_dir, manifest, split)["shards"]:
            path = shard_dir / shard["name"]
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in {MANIFEST} is missing; {_REPRO_HINT}")
            if sha256_file(path) != shard["sha256"]:
                raise ShardError(f"{path}: sha256 mismatch with {MANIFEST} (file changed or corrupt); {_REPRO_HINT}")


def checked_shards(shard_dir: Path, splits: tuple[str, ...]) -> tuple[dict, dict[str, list[str]]]:
    """The manifest and the shard URLs of each of `splits`, once those shards match their sha256."""
    manifest = load_manifest(shard_dir)
    verify_shards(shard_dir, manifest, splits=splits)
    return manifest, {split: shard_urls(shard_dir, manifest, split) for split in splits}


def shard_urls(shard_dir: Path, manifest: dict, split: str) -> list[str]:
    """Absolute paths of `split`'s shards, in manifest order (what `wds.WebDataset` takes)."""
    shard_dir = Path(shard_dir).resolve()
    return [str(shard_dir / shard["name"]) for shard in _split_entry(shard_dir, manifest, split)["shards"]]
