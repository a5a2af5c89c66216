"""The prepare stage's work: scan a source, split it train/val/test, write the index and prepare.json.

No image is kept: `index.npz` says for each split where its images are in the source (`<split>_refs`, see
`latentzoo.data.sources`) and their labels (`<split>_labels`), plus, for an image folder, the files the refs point
at (`files`); the shard stage reads the images from the source. Memory grows with the number of images only by
those few bytes each (and a path for an image folder), never by their pixels.

The split is stratified by class (scikit-learn's `train_test_split`) and fixed by the seed. When the source has its
own test part (MNIST's t10k files), that is the test split and only val is carved out of the training part.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.config import DataConfig
from latentzoo.data.sources import ImageSet, Mapper, SourceIndex, in_process, read_images, scan_source
from latentzoo.errors import DataError

SPLITS = ("train", "val", "test")
INDEX = "index.npz"
INFO = "prepare.json"


def _carve(idx: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into (rest, `size` held out), stratified by `labels[idx]` when every class can be."""
    y = labels[idx]
    _, counts = np.unique(y, return_counts=True)
    n_classes = len(counts)
    stratify = y
    if counts.min() < 2 or size < n_classes or len(idx) - size < n_classes:
        warnings.warn(
            f"split: not stratified (smallest class has {counts.min()} images, {n_classes} classes, "
            f"{size} held out of {len(idx)}); class proportions may differ between splits",
            stacklevel=3,
        )
        stratify = None
    from sklearn.model_selection import train_test_split  # here: 2 s of imports every process reading shards skips

    rest, held = train_test_split(idx, test_size=size, stratify=stratify, random_state=seed)
    return rest, held


def split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float | None, seed: int
) -> dict[str, np.ndarray]:
    """Stratified, seeded split of range(len(labels)) → {"train", "val"[, "test"]}: sorted, disjoint, covering.

    Fractions are of the whole set (rounded, at least one image each). test_fraction None carves no test split
    (the source has its own), so the result has only "train" and "val".
    """
    n = len(labels)
    n_test = 0 if test_fraction is None else max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_val - n_test < 1:
        raise DataError(f"split: {n} images are too few for {n_val} val + {n_test} test + at least 1 train")
    rest, out = np.arange(n), {}
    if test_fraction is not None:
        rest, out["test"] = _carve(rest, labels, n_test, seed)
    rest, out["val"] = _carve(rest, labels, n_val, seed)
    out["train"] = rest
    return {name: np.sort(out[name]) for name in SPLITS if name in out}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, but byte-identical for identical arrays (fixed zip timestamps), so DVC hashes are stable."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


@dataclass
class Prepared:
    """What the prepare stage wrote: prepare.json, and each split's refs and labels."""

    info: dict
    refs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    files: list[str] | None  # imagefolder: what a ref points at, relative to data.path

    @property
    def data(self) -> DataConfig:
        """The `data` params the source was scanned with (`read_images` reads it the same way)."""
        return DataConfig(**self.info["data"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        c, h, w = self.info["image_shape"]
        return h, w, c

    def images(self, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images [start, stop) of `split`, read from the source."""
        refs = self.refs[split][start:stop]
        files = None if self.files is None else [self.files[r] for r in refs]
        return read_images(self.data, self.shape, refs, files)


def load_prepared(prepared_dir: Path) -> Prepared:
    """Read prepare.json and index.npz back; DataError naming the file when one is missing or unreadable."""
    prepared_dir = Path(prepared_dir)
    info_path, index_path = prepared_dir / INFO, prepared_dir / INDEX
    try:
        info = json.loads(info_path.read_text())
        with np.load(index_path, allow_pickle=False) as f:
            refs = {split: f[f"{split}_refs"] for split in SPLITS}
            labels = {split: f[f"{split}_labels"] for split in SPLITS}
            files = [name.decode() for name in f["files"]] if "files" in f else None
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found; run the prepare stage (dvc repro prepare)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{prepared_dir}: unreadable prepared index ({exc!r}); re-run dvc repro prepare") from None
    if "data" not in info or "image_shape" not in info:
        raise DataError(f"{info_path}: written by an older version; re-run dvc repro prepare")
    return Prepared(info, refs, labels, files)


def load_split(prepared_dir: Path, split: str) -> ImageSet:
    """One prepared split's images (read from the source) and labels, in memory."""
    prepared = load_prepared(prepared_dir)
    return ImageSet(prepared.images(split), prepared.labels[split])


def _split(index: SourceIndex, cfg: DataConfig, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each split's refs and labels."""
    test_fraction = None if index.test_refs is not None else cfg.test_fraction
    positions = split_indices(index.labels, cfg.val_fraction, test_fraction, seed)
    refs = {name: index.refs[i] for name, i in positions.items()}
    labels = {name: index.labels[i] for name, i in positions.items()}
    if index.test_refs is not None:
        refs["test"], labels["test"] = index.test_refs, index.test_labels
    for name in SPLITS:
        if len(refs[name]) == 0:
            raise DataError(f"{cfg.path or cfg.source}: the {name} split would be empty")
    return {name: refs[name] for name in SPLITS}, {name: labels[name] for name in SPLITS}


def prepare(cfg: DataConfig, seed: int, out_dir: Path, mapper: Mapper = in_process) -> dict:
    """Write out_dir/index.npz (each split's refs and labels, an image folder's files) and out_dir/prepare.json,
    atomically. `mapper` runs the scan's checks of an image folder (in this process by default).

    Returns prepare.json's content: source, path, image_shape [C, H, W], classes, num_classes, seed, counts,
    class_counts (per split, per class), skipped ({"count", "files"}), source_sha256 (of the source's bytes: a
    changed image changes this file, so DVC re-runs the shard stage) and data (the params the source is read with).
    """
    index = scan_source(cfg, mapper)
    refs, labels = _split(index, cfg, seed)
    h, w, c = index.shape
    info = {
        "source": cfg.source,
        "path": cfg.path,
        "image_shape": [c, h, w],
        "classes": index.classes,
        "num_classes": len(index.classes),
        "seed": seed,
        "counts": {name: len(r) for name, r in refs.items()},
        "class_counts": {name: np.bincount(y, minlength=len(index.classes)).tolist() for name, y in labels.items()},
        "skipped": {"count": len(index.skipped), "files": index.skipped},
        "source_sha256": index.digest,
        "data": cfg.model_dump(mode="json"),
    }
    arrays = {f"{name}_{kind}": a[name] for name in SPLITS for kind, a in (("refs", refs), ("labels", labels))}
    if index.files is not None:
        arrays["files"] = np.array([name.encode() for name in index.files])
    with atomic_dir(out_dir) as tmp:
        save_npz(tmp / INDEX, **arrays)
        (tmp / INFO).write_text(json_text(info))
    return info
