"""Image sources: each turns `data.*` params into uint8 NHWC arrays with int64 labels.

- ``digits``: scikit-learn's bundled 8x8 digits (offline; for tests and quick runs).
- ``idx``: MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` etc.) in a folder.
- ``imagefolder``: ``<path>/<class name>/*.png|jpg|jpeg``, one sub-folder per class.

Every problem with an input file is a `DataError` naming the file. With ``data.on_error: skip`` an unreadable
image is left out and recorded in `SourceData.skipped` instead.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from latentzoo.errors import DataError

if TYPE_CHECKING:
    from latentzoo.config import DataConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)
# What PIL may raise on a corrupt or truncated file, besides OSError (which covers "cannot identify image file").
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


@dataclass
class ImageSet:
    """A set of images and their labels."""

    images: np.ndarray  # uint8, (N, H, W, C), C = 1 or 3
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> ImageSet:
        """The subset at indices `idx`, in that order."""
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass
class SourceData:
    """What a source yields, before splitting."""

    train: ImageSet  # everything, or the source's own train part
    test: ImageSet | None  # the source's own test part (idx t10k files) when data.keep_source_test, else None
    classes: list[str]  # class names, index = label
    skipped: list[dict] = field(default_factory=list)  # [{"file", "reason"}], only with data.on_error == "skip"


def load_source(cfg: DataConfig) -> SourceData:
    """Load the images `cfg.source` names; `cfg.limit` keeps the first N training images."""
    loaders = {"digits": _load_digits, "idx": _load_idx, "imagefolder": _load_imagefolder}
    data = loaders[cfg.source](cfg)
    if cfg.limit is not None and cfg.source != "imagefolder":  # imagefolder applies it while reading
        data.train = data.train.take(np.arange(min(cfg.limit, len(data.train))))
    return data


# ---------------------------------------------------------------- digits


def _load_digits(cfg: DataConfig) -> SourceData:
    """scikit-learn's 8x8 digits: values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    return SourceData(ImageSet(images, labels), None, [str(c) for c in digits.target_names])


# ---------------------------------------------------------------- idx


MAX_IDX_BYTES = 8192 * 2**20  # data.max_idx_mb's default


def read_idx(path: Path, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file of uint8 (http://yann.lecun.com/exdb/mnist/): big-endian magic, dims, then the data.

    A `.gz` file is decompressed as a stream, never past what the header declares (+1 byte to find trailing
    data), and a header declaring more than `max_bytes` is refused before any data is read: a gzip bomb (a few
    kB that inflate to many GB) costs nothing."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            return _parse_idx(f, path, magic, max_bytes)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_idx(f, path: Path, magic: int, max_bytes: int) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    found = int.from_bytes(head, "big")
    if found != magic:
        raise DataError(f"{path}: not an IDX file of this kind (magic 0x{found:08x}, expected 0x{magic:08x})")
    ndim = magic & 0xFF
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, expected {4 + 4 * ndim})")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    expected = math.prod(shape)  # Python ints: np.prod wraps past 2**63
    if expected > max_bytes:
        raise DataError(
            f"{path}: header declares {shape} = {expected} bytes, more than data.max_idx_mb = "
            f"{max_bytes // 2**20} MB (a damaged header or a gzip bomb?); raise data.max_idx_mb if real"
        )
    data = f.read(expected + 1)
    if len(data) < expected:
        raise DataError(f"{path}: truncated, header says {shape} = {expected} bytes of data, found {len(data)}")
    if len(data) > expected:
        raise DataError(f"{path}: unexpected bytes after the {shape} data the header declares")
    f.read(1)  # at the end of a .gz stream: checks its CRC and length
    return np.frombuffer(data, np.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists (raw first)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_pair(folder: Path, prefix: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """(images NHW, labels, labels file) of `<prefix>-images/labels`, None if neither file exists."""
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-images-idx3-ubyte" if images_path is None else f"{prefix}-labels-idx1-ubyte"
        raise DataError(f"{folder}: {missing}[.gz] is missing (found the matching {prefix} file)")
    max_bytes = cfg.max_idx_mb * 2**20
    images = read_idx(images_path, IDX_IMAGES_MAGIC, max_bytes)
    height, width = images.shape[1:]
    if height * width == 0:  # no pixels: nothing to learn, and the shard stage cannot encode them
        raise DataError(f"{images_path}: images of {width}x{height} pixels")
    if height * width > cfg.max_pixels:
        raise DataError(
            f"{images_path}: images of {width}x{height} = {width * height} pixels exceed "
            f"data.max_pixels = {cfg.max_pixels}"
        )
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, max_bytes)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels, labels_path


def _load_idx(cfg: DataConfig) -> SourceData:
    """MNIST-style IDX files; the t10k part is the test split (keep_source_test) or pooled into train.

    classes are the distinct label values as strings, sorted; labels are re-indexed to 0..K-1 by that order
    (the identity for MNIST's 0..9).
    """
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.path is not a directory")
    train = _read_idx_pair(folder, "train", cfg)
    if train is None:
        raise DataError(f"{folder}: no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] found")
    test = _read_idx_pair(folder, "t10k", cfg)
    train_images, train_labels, _ = train
    if test is not None and not cfg.keep_source_test:
        train_images = np.concatenate([train_images, test[0]])
        train_labels = np.concatenate([train_labels, test[1]])
        test = None
    values = np.unique(train_labels)
    data = SourceData(_idx_set(train_images, train_labels, values), None, [str(v) for v in values])
    if test is not None:
        images, labels, labels_path = test
        unknown = np.setdiff1d(np.unique(labels), values)
        if unknown.size:
            known = ", ".join(str(v) for v in values)
            raise DataError(f"{labels_path}: label {unknown[0]} does not occur in the training labels ({known})")
        if images.shape[1:] != train_images.shape[1:]:
            raise DataError(f"{folder}: t10k images are {images.shape[1:]}, train images {train_images.shape[1:]}")
        data.test = _idx_set(images, labels, values)
    return data


def _idx_set(images: np.ndarray, labels: np.ndarray, values: np.ndarray) -> ImageSet:
    """NHW uint8 + raw label values → ImageSet with a channel axis and labels indexed into `values`."""
    return ImageSet(images[..., None].copy(), np.searchsorted(values, labels).astype(np.int64))


# ---------------------------------------------------------------- imagefolder


def _list_imagefolder(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted sub-folders) and each class's image files (sorted); hidden entries are ignored."""
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class name>/*.png)")
    files = []
    for d in class_dirs:
        images = sorted(
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(f"{d}: class folder has no images (*.png, *.jpg, *.jpeg)")
        files.append(images)
    return [d.name for d in class_dirs], files


def _interleave(files: list[list[Path]]) -> list[tuple[Path, int]]:
    """(file, label) taking one file per class in turn, so any prefix (data.limit) covers every class."""
    out = []
    for i in range(max(len(f) for f in files)):
        out.extend((f[i], label) for label, f in enumerate(files) if i < len(f))
    return out


def _open_image(path: Path, cfg: DataConfig) -> Image.Image:
    """Decode one image fully (load() catches truncation) after checking its size against data.max_pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # data.max_pixels is our limit
        with Image.open(path) as im:
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise ValueError(
                    f"{w}x{h} = {w * h} pixels exceeds data.max_pixels = {cfg.max_pixels}; decompression bomb?"
                )
            im.load()  # pixels stay available after the file is closed
            return im


def _to_array(im: Image.Image, channels: int | None, size: int | None) -> np.ndarray:
    """PIL image → uint8 HWC: grey ("L") or RGB as `channels` asks (None: as the image is), resized if asked."""
    grey = channels == 1 or (channels is None and im.mode in GREY_MODES)
    im = im.convert("L" if grey else "RGB")
    if size is not None:
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _load_imagefolder(cfg: DataConfig) -> SourceData:
    """One sub-folder per class; images converted to data.channels and resized to data.image_size."""
    root = Path(cfg.path)
    classes, files = _list_imagefolder(root)
    arrays, labels, skipped = [], [], []
    for path, label in _interleave(files):
        if cfg.limit is not None and len(arrays) >= cfg.limit:
            break
        try:
            im = _open_image(path, cfg)
        except _DECODE_ERRORS as exc:
            if cfg.on_error == "raise":
                raise DataError(f"{path}: cannot read image ({exc})") from None
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        arr = _to_array(im, cfg.channels, cfg.image_size)
        if arrays and arr.shape[:2] != arrays[0].shape[:2]:
            raise DataError(
                f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from the first image's "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; set data.image_size to resize all"
            )
        arrays.append(arr)
        labels.append(label)
    if not arrays:
        raise DataError(f"{root}: no readable images ({len(skipped)} skipped)")
    if cfg.channels is None and any(a.shape[2] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]  # = PIL's L → RGB
    train = ImageSet(np.stack(arrays), np.asarray(labels, dtype=np.int64))
    return SourceData(train, None, classes, skipped)
