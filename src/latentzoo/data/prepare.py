"""The prepare stage's work: load a source, split it train/val/test, write one .npz per split and prepare.json.

The split is stratified by class (scikit-learn's `train_test_split`) and fixed by the seed. When the source has its
own test part (MNIST's t10k files), that is the test split and only val is carved out of the training part.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.model_selection import train_test_split

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.data.sources import ImageSet, load_source
from latentzoo.errors import DataError

if TYPE_CHECKING:
    from latentzoo.config import DataConfig

SPLITS = ("train", "val", "test")


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


def load_split(prepared_dir: Path, split: str) -> ImageSet:
    """Read `<prepared_dir>/<split>.npz` back; DataError naming the file when it is missing or unreadable."""
    path = Path(prepared_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            return ImageSet(f["images"], f["labels"])
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage (dvc repro prepare)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable prepared split ({exc}); re-run dvc repro prepare") from None


def _split_sets(cfg: DataConfig, seed: int) -> tuple[dict[str, ImageSet], list[str], list[dict]]:
    """Load the source and split it: ({split: ImageSet}, classes, skipped files)."""
    src = load_source(cfg)
    test_fraction = None if src.test is not None else cfg.test_fraction
    idx = split_indices(src.train.labels, cfg.val_fraction, test_fraction, seed)
    sets = {name: src.train.take(i) for name, i in idx.items()}
    if src.test is not None:
        sets["test"] = src.test
    for name in SPLITS:
        if len(sets[name]) == 0:
            raise DataError(f"{cfg.path or cfg.source}: the {name} split would be empty")
    return sets, src.classes, src.skipped


def prepare(cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    """Write out_dir/{train,val,test}.npz (images uint8 NHWC, labels int64) and out_dir/prepare.json, atomically.

    Returns prepare.json's content: source, path, image_shape [C, H, W], classes, num_classes, seed, counts,
    class_counts (per split, per class) and skipped ({"count", "files"}).
    """
    sets, classes, skipped = _split_sets(cfg, seed)
    n, h, w, c = sets["train"].images.shape
    info = {
        "source": cfg.source,
        "path": cfg.path,
        "image_shape": [c, h, w],
        "classes": classes,
        "num_classes": len(classes),
        "seed": seed,
        "counts": {name: len(s) for name, s in sets.items()},
        "class_counts": {name: np.bincount(s.labels, minlength=len(classes)).tolist() for name, s in sets.items()},
        "skipped": {"count": len(skipped), "files": skipped},
    }
    with atomic_dir(out_dir) as tmp:
        for name, s in sets.items():
            save_npz(tmp / f"{name}.npz", images=s.images, labels=s.labels)
        (tmp / "prepare.json").write_text(json_text(info))
    return info
