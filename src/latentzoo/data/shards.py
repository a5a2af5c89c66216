"""The shard stage's work: the prepared index → WebDataset tar shards, plus a manifest with their checksums.

Each shard is one `ShardJob` (a range of one split's refs and labels): `write_shard` reads those images straight
from the source and writes the tar under a temporary name, then renames it, so jobs can run in any order, in
parallel (the shard stage runs them as Ray tasks) and again after a failure. A shard's bytes depend only on its job,
never on how many jobs ran at once.

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

import functools
import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.config import DataConfig
from latentzoo.data.prepare import INFO, SPLITS, Prepared, load_prepared
from latentzoo.data.remote import check_location, is_uri, sha256_url, upload
from latentzoo.data.sources import Mapper, in_process, read_images, sha256_file
from latentzoo.errors import DataError, ShardError

MANIFEST = "manifest.json"
FORMAT = 2  # 1: one PNG per image
BLOCK_BYTES = 1 << 20  # pixels per block (one tar member of images)
MAX_BLOCK = 1024  # images per block at most
_REPRO_HINT = "re-run the shard stage (dvc repro shard)"


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


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: images [first, first + len(refs)) of `split`, where the source has them."""

    name: str  # <split>-<k>.tar
    split: str
    first: int
    refs: np.ndarray
    labels: np.ndarray
    files: list[str] | None  # imagefolder: the files the refs point at


def shard_jobs(prepared: Prepared, maxcount: int) -> list[ShardJob]:
    """Every split cut into shards of `maxcount` images (the last fewer), in manifest order."""
    jobs = []
    for split in SPLITS:
        refs, labels = prepared.refs[split], prepared.labels[split]
        for k, first in enumerate(range(0, len(refs), maxcount)):
            mine = refs[first : first + maxcount]
            files = None if prepared.files is None else [prepared.files[r] for r in mine]
            jobs.append(ShardJob(f"{split}-{k:06d}.tar", split, first, mine, labels[first : first + maxcount], files))
    return jobs


def write_shard(
    job: ShardJob, data: DataConfig, shape: tuple[int, int, int], folder: Path | None, location: str | None = None
) -> dict:
    """Read the job's images from the source `data` names and write them as `folder/<job.name>` (a tar of blocks,
    renamed into place when complete), or upload them to `location/<job.name>` (object storage; folder None: a
    temporary one of this process); its manifest entry."""
    if location is not None:
        with tempfile.TemporaryDirectory(prefix="lz-shard-") as local:
            entry = write_shard(job, data, shape, Path(local))
            upload(Path(local) / job.name, f"{location}/{job.name}")
            return entry
    images = read_images(data, shape, job.refs, job.files)
    per_block = block_size(shape)
    path, partial = Path(folder) / job.name, Path(folder) / f".{job.name}.{os.getpid()}"
    # mtime=0 and fixed user/group: TarWriter otherwise stamps time.time(), making every run's bytes differ.
    with wds.TarWriter(str(partial), mtime=0, user="latentzoo", group="latentzoo") as writer:
        for start in range(0, len(images), per_block):
            block = slice(start, start + per_block)
            writer.write(
                {
                    "__key__": sample_key(job.split, job.first + start),
                    "images.npy": encode_array(images[block]),
                    "labels.npy": encode_array(job.labels[block].astype(np.int64)),
                }
            )
    os.replace(partial, path)
    return {"name": job.name, "count": len(job.refs), "sha256": sha256_file(path)}


def write_shards(
    prepared_dir: Path,
    out_dir: Path,
    maxcount: int,
    progress: bool = True,
    mapper: Mapper = in_process,
    location: str | None = None,
) -> dict:
    """Shard every split of `prepared_dir` into `out_dir` (atomically: manifest last, then one rename), running
    the shard jobs through `mapper(task, jobs)`, which yields their results in order. With a `location` URI
    (`shard.uri`, object storage) the tars go there and `out_dir` holds only the manifest, which names it.

    Returns the manifest: format, image_shape, classes, num_classes, prepared (sha256 of prepare.json), maxcount,
    skipped (the source files prepare left out), splits {split: {"count", "shards": [{"name", "count", "sha256"}]}}.
    """
    prepared = load_prepared(prepared_dir)
    for split in SPLITS:
        if len(prepared.refs[split]) == 0:
            raise DataError(f"{Path(prepared_dir) / INFO}: empty {split} split; re-run dvc repro prepare")
    info, data = prepared.info, prepared.data
    if data.path is not None and not is_uri(data.path):  # tasks run elsewhere (Ray workers): an absolute path
        data = data.model_copy(update={"path": str(Path(data.path).resolve())})
    manifest = {
        "format": FORMAT,
        "image_shape": info["image_shape"],
        "classes": info["classes"],
        "num_classes": info["num_classes"],
        "prepared": hashlib.sha256((Path(prepared_dir) / INFO).read_bytes()).hexdigest(),
        "maxcount": maxcount,
        "skipped": info.get("skipped", {"count": 0, "files": []}),  # files prepare left out (on_error: skip)
        "splits": {split: {"count": len(prepared.refs[split]), "shards": []} for split in SPLITS},
    }
    if location is not None:
        location = location.rstrip("/")
        check_location(location)
        manifest["location"] = location
    jobs = shard_jobs(prepared, maxcount)
    total = sum(len(job.refs) for job in jobs)
    bar = tqdm(total=total, desc="shard", unit="img", mininterval=1.0, disable=not progress)
    with atomic_dir(out_dir) as tmp, bar:
        folder = None if location else tmp.resolve()
        task = functools.partial(write_shard, data=data, shape=prepared.shape, folder=folder, location=location)
        for job, entry in zip(jobs, mapper(task, jobs), strict=True):
            manifest["splits"][job.split]["shards"].append(entry)
            bar.update(entry["count"])
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
    """Check every shard of `splits` (default: all) exists and matches its manifest sha256; ShardError if not.
    Shards in object storage are read back in full to check them, as local ones are."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir) if manifest is None else manifest
    for split in manifest["splits"] if splits is None else splits:
        urls = shard_urls(shard_dir, manifest, split)
        for shard, url in zip(_split_entry(shard_dir, manifest, split)["shards"], urls, strict=True):
            if is_uri(url):
                found = sha256_url(url)
            elif Path(url).is_file():
                found = sha256_file(Path(url))
            else:
                raise ShardError(f"{url}: shard listed in {MANIFEST} is missing; {_REPRO_HINT}")
            if found != shard["sha256"]:
                raise ShardError(f"{url}: sha256 mismatch with {MANIFEST} (file changed or corrupt); {_REPRO_HINT}")


def checked_shards(shard_dir: Path, splits: tuple[str, ...]) -> tuple[dict, dict[str, list[str]]]:
    """The manifest and the shard URLs of each of `splits`, once those shards match their sha256."""
    manifest = load_manifest(shard_dir)
    verify_shards(shard_dir, manifest, splits=splits)
    return manifest, {split: shard_urls(shard_dir, manifest, split) for split in splits}


def shard_urls(shard_dir: Path, manifest: dict, split: str) -> list[str]:
    """`split`'s shards in manifest order (what `wds.WebDataset` takes): absolute paths, or URIs under the
    manifest's `location` when the shards are in object storage."""
    names = [shard["name"] for shard in _split_entry(shard_dir, manifest, split)["shards"]]
    if manifest.get("location"):
        return [f"{manifest['location']}/{name}" for name in names]
    shard_dir = Path(shard_dir).resolve()
    return [str(shard_dir / name) for name in names]
