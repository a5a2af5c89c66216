"""The shard stage's work: prepared .npz splits → WebDataset tar shards, plus a manifest with their checksums.

Each sample is ``<split>-<index>.png`` (lossless PNG, mode L or RGB) and ``<split>-<index>.cls`` (the label as
ASCII digits), so any WebDataset reader decodes it. Shards are byte-identical for identical input (fixed tar
mtime and owner), and `manifest.json` records each shard's sample count and sha256 so training can refuse a shard
that changed on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.data.prepare import SPLITS, load_split
from latentzoo.errors import DataError, ShardError

MANIFEST = "manifest.json"
FORMAT = 1
_REPRO_HINT = "re-run the shard stage (dvc repro shard)"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HWC (C = 1 or 3) → lossless PNG bytes; deterministic (fixed zlib level, no optimize pass)."""
    im = Image.fromarray(image[..., 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_key(split: str, index: int) -> str:
    """The WebDataset key of sample `index` of `split`: 'train-0000042'."""
    return f"{split}-{index:07d}"


def _write_split(tmp: Path, split: str, images: np.ndarray, labels: np.ndarray, maxcount: int, bar: tqdm) -> dict:
    """Write one split as `<split>-000000.tar`, ... into `tmp`; its manifest entry {"count", "shards"}."""
    pattern = str(tmp).replace("%", "%%") + f"/{split}-%06d.tar"
    # mtime=0 and fixed user/group: TarWriter otherwise stamps time.time(), making every run's bytes differ.
    writer = wds.ShardWriter(
        pattern, maxcount=maxcount, maxsize=float("inf"), verbose=0, mtime=0, user="latentzoo", group="latentzoo"
    )
    try:
        for i, (image, label) in enumerate(zip(images, labels)):
            writer.write({"__key__": sample_key(split, i), "png": encode_png(image), "cls": int(label)})
            bar.update(1)
    finally:
        writer.close()
    n, shards = len(labels), []
    for k, start in enumerate(range(0, n, maxcount)):
        path = tmp / f"{split}-{k:06d}.tar"
        shards.append({"name": path.name, "count": min(maxcount, n - start), "sha256": sha256_file(path)})
    return {"count": n, "shards": shards}


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
