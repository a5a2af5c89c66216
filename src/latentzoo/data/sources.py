"""Image sources, read in two passes so that no stage holds a whole source in memory.

`scan_source(cfg)` walks a source and validates every image without keeping its pixels: a `SourceIndex` says where
each image is (its *ref*), its label, the shape every image is read at and a digest of the source's bytes (the
prepare stage writes it down). `read_images(cfg, shape, refs, files)` decodes only the images asked for, which is
what each shard task does. `load_source(cfg)` does both at once, for data that fits in memory.

- ``digits``: scikit-learn's bundled 8x8 digits (offline; for tests and quick runs). A ref is a row.
- ``idx``: MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` etc.) in a folder, read in chunks. A ref is a
  row of the train file, or ``n_train + row`` of the t10k file.
- ``imagefolder``: ``<path>/<class name>/*.png|jpg|jpeg``, one sub-folder per class. A ref is a position in
  `SourceIndex.files` (paths relative to ``data.path``, one class after another in turn).

Every problem with an input file is a `DataError` naming the file. With ``data.on_error: skip`` an unreadable
image is left out and recorded in `SourceIndex.skipped` instead.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from latentzoo.data.object_path import ObjectPath, source_path
from latentzoo.errors import DataError

if TYPE_CHECKING:
    from latentzoo.config import DataConfig

SourcePath = Path | ObjectPath  # data.path on a disk, or in object storage (latentzoo.data.object_path)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)
CHUNK_BYTES = 1 << 22  # what an IDX file is read in
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
class SourceIndex:
    """A source as prepare sees it: where each image is and its label, no pixels."""

    refs: np.ndarray  # int64 (N,): every image, or the source's own train part
    labels: np.ndarray  # int64 (N,)
    test_refs: np.ndarray | None  # the source's own test part (idx t10k files) when data.keep_source_test
    test_labels: np.ndarray | None
    classes: list[str]  # class names, index = label
    shape: tuple[int, int, int]  # (H, W, C) every image is read at
    digest: str  # sha256 over the source's bytes: a changed image changes the prepared index
    files: list[str] | None = None  # imagefolder: what a ref points at, relative to data.path
    skipped: list[dict] = field(default_factory=list)  # [{"file", "reason"}], only with data.on_error == "skip"


@dataclass
class SourceData:
    """A whole source in memory (`load_source`)."""

    train: ImageSet  # everything, or the source's own train part
    test: ImageSet | None  # the source's own test part (idx t10k files) when data.keep_source_test, else None
    classes: list[str]  # class names, index = label
    skipped: list[dict] = field(default_factory=list)  # [{"file", "reason"}], only with data.on_error == "skip"


Mapper = Callable[[Callable[[Any], Any], list], Iterable[Any]]  # (task, jobs) → the tasks' results, in order


def in_process(task: Callable[[Any], Any], jobs: list) -> Iterator[Any]:
    """Run the jobs here, one after another (a stage on Ray passes `latentzoo.stages.tasks.ray_tasks` instead)."""
    return map(task, jobs)


def scan_source(cfg: DataConfig, mapper: Mapper = in_process) -> SourceIndex:
    """Validate the images `cfg.source` names without keeping them; `cfg.limit` keeps the first N training images.
    An image folder's files are checked in chunks through `mapper` (the prepare stage's runs them as Ray tasks)."""
    if cfg.source == "imagefolder":  # applies the limit while reading
        return _scan_imagefolder(cfg, mapper)
    index = _scan_digits(cfg) if cfg.source == "digits" else _scan_idx(cfg)
    if cfg.limit is not None:
        index.refs, index.labels = index.refs[: cfg.limit], index.labels[: cfg.limit]
    return index


def read_images(cfg: DataConfig, shape: tuple[int, int, int], refs: np.ndarray, files: list[str] | None = None):
    """The images at `refs` (imagefolder: the `files` they point at), uint8 (N, H, W, C) in that order."""
    if cfg.source == "digits":
        return _digits_images()[refs]
    if cfg.source == "idx":
        return _read_idx_refs(source_path(cfg.path), refs, cfg)
    return _read_files(source_path(cfg.path), files, shape, cfg)


def load_source(cfg: DataConfig) -> SourceData:
    """The whole source in memory: `scan_source`, then `read_images` of every image it kept."""
    index = scan_source(cfg)
    paths = (lambda refs: [index.files[r] for r in refs]) if index.files is not None else (lambda refs: None)

    def images(refs, labels):
        return ImageSet(read_images(cfg, index.shape, refs, paths(refs)), labels)

    test = None if index.test_refs is None else images(index.test_refs, index.test_labels)
    return SourceData(images(index.refs, index.labels), test, index.classes, index.skipped)


def sha256_file(path: SourcePath, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") if isinstance(path, ObjectPath) else open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- digits


def _digits_images() -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 NHWC: values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def _scan_digits(cfg: DataConfig) -> SourceIndex:
    from sklearn import __version__
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    digest = hashlib.sha256(f"sklearn {__version__} digits".encode() + digits.data.tobytes()).hexdigest()
    classes = [str(c) for c in digits.target_names]
    return SourceIndex(np.arange(len(labels)), labels, None, None, classes, (8, 8, 1), digest)


# ---------------------------------------------------------------- idx


MAX_IDX_BYTES = 8192 * 2**20  # data.max_idx_mb's default


def read_idx(path: SourcePath, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file of uint8 (http://yann.lecun.com/exdb/mnist/): big-endian magic, dims, then the data.

    A `.gz` file is decompressed as a stream, never past what the header declares (+1 byte to find trailing
    data), and a header declaring more than `max_bytes` is refused before any data is read: a gzip bomb (a few
    kB that inflate to many GB) costs nothing."""
    with _open_idx(path) as f:
        shape = _idx_header(f, path, magic, max_bytes)
        data = _idx_data(f, path, shape, keep=True)
    return np.frombuffer(data, np.uint8).reshape(shape)


def check_idx(path: SourcePath, magic: int, max_bytes: int = MAX_IDX_BYTES) -> tuple[int, ...]:
    """`read_idx`'s checks (header, length, trailing bytes, gzip CRC), reading the data in chunks; its shape."""
    with _open_idx(path) as f:
        shape = _idx_header(f, path, magic, max_bytes)
        _idx_data(f, path, shape, keep=False)
    return shape


class _open_idx:
    """An IDX file for reading (a .gz one decompressed as a stream); read errors as DataErrors naming it."""

    def __init__(self, path: SourcePath):
        self.path = path

    def __enter__(self):
        try:
            self.raw = self.path.open("rb")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self.file = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.path.suffix == ".gz" else self.raw
        return self.file

    def __exit__(self, kind, exc, tb):
        self.file.close()
        self.raw.close()
        if isinstance(exc, DataError) or exc is None:
            return False
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise DataError(f"{self.path}: corrupt gzip file ({exc})") from None
        if isinstance(exc, OSError):
            raise DataError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        return False


def _idx_header(f, path: SourcePath, magic: int, max_bytes: int) -> tuple[int, ...]:
    """The shape an IDX header declares, after checking its magic and that the data is at most `max_bytes`."""
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
    return shape


def _idx_data(f, path: SourcePath, shape: tuple[int, ...], keep: bool) -> bytes:
    """Read the data the header declared, in chunks, and check nothing follows it; the bytes when `keep`."""
    expected, seen, chunks = math.prod(shape), 0, []
    while seen <= expected:
        chunk = f.read(min(CHUNK_BYTES, expected + 1 - seen))
        if not chunk:
            break
        seen += len(chunk)
        if keep:
            chunks.append(chunk)
    if seen < expected:
        raise DataError(f"{path}: truncated, header says {shape} = {expected} bytes of data, found {seen}")
    if seen > expected:
        raise DataError(f"{path}: unexpected bytes after the {shape} data the header declares")
    f.read(1)  # at the end of a .gz stream: checks its CRC and length
    return b"".join(chunks)[:expected]


def _find_idx(folder: SourcePath, stem: str) -> SourcePath | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists (raw first)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_parts(folder: SourcePath) -> list[tuple[str, SourcePath, SourcePath]]:
    """(prefix, images file, labels file) of the train pair, then the t10k pair if there is one."""
    parts = []
    for prefix in ("train", "t10k"):
        images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            missing = f"{prefix}-images-idx3-ubyte" if images_path is None else f"{prefix}-labels-idx1-ubyte"
            raise DataError(f"{folder}: {missing}[.gz] is missing (found the matching {prefix} file)")
        parts.append((prefix, images_path, labels_path))
    if not parts or parts[0][0] != "train":
        raise DataError(f"{folder}: no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] found")
    return parts


def _check_idx_pair(
    images_path: SourcePath, labels_path: SourcePath, cfg: DataConfig
) -> tuple[tuple[int, ...], np.ndarray]:
    """(images shape, labels) of one IDX pair, every check made, no image kept."""
    max_bytes = cfg.max_idx_mb * 2**20
    shape = check_idx(images_path, IDX_IMAGES_MAGIC, max_bytes)
    height, width = shape[1:]
    if height * width == 0:  # no pixels: nothing to learn, and the shard stage cannot encode them
        raise DataError(f"{images_path}: images of {width}x{height} pixels")
    if height * width > cfg.max_pixels:
        raise DataError(
            f"{images_path}: images of {width}x{height} = {width * height} pixels exceed "
            f"data.max_pixels = {cfg.max_pixels}"
        )
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, max_bytes)
    if shape[0] != len(labels):
        raise DataError(f"{images_path} has {shape[0]} images but {labels_path} has {len(labels)} labels")
    return shape, labels


def _scan_idx(cfg: DataConfig) -> SourceIndex:
    """MNIST-style IDX files; the t10k part is the test split (keep_source_test) or pooled into train.

    classes are the distinct label values as strings, sorted; labels are re-indexed to 0..K-1 by that order
    (the identity for MNIST's 0..9).
    """
    folder = source_path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.path is not a directory")
    parts = _idx_parts(folder)
    digest = hashlib.sha256()
    checked = []
    for _, images_path, labels_path in parts:
        checked.append(_check_idx_pair(images_path, labels_path, cfg))
        for path in (images_path, labels_path):
            digest.update(f"{path.name} {sha256_file(path)}\n".encode())
    (train_shape, train_labels), test = checked[0], (checked[1] if len(checked) > 1 else None)
    n_train, shape = train_shape[0], (*train_shape[1:], 1)
    if test is not None and test[0][1:] != train_shape[1:]:
        raise DataError(f"{folder}: t10k images are {test[0][1:]}, train images {train_shape[1:]}")
    pooled = test is not None and not cfg.keep_source_test
    raw = np.concatenate([train_labels, test[1]]) if pooled else train_labels
    values = np.unique(raw)
    index = SourceIndex(
        np.arange(len(raw)), _label_index(raw, values), None, None, [str(v) for v in values], shape, digest.hexdigest()
    )
    if test is not None and not pooled:
        unknown = np.setdiff1d(np.unique(test[1]), values)
        if unknown.size:
            known = ", ".join(str(v) for v in values)
            raise DataError(f"{parts[1][2]}: label {unknown[0]} does not occur in the training labels ({known})")
        index.test_refs = n_train + np.arange(len(test[1]))
        index.test_labels = _label_index(test[1], values)
    return index


def _label_index(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Raw label values → their positions in `values` (int64)."""
    return np.searchsorted(values, labels).astype(np.int64)


def _read_idx_refs(folder: SourcePath, refs: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The images at `refs` (train rows, then n_train + t10k rows), read in file order, one pass per file."""
    refs = np.asarray(refs, dtype=np.int64)
    out, start = None, 0
    for _, images_path, _ in _idx_parts(folder):
        with _open_idx(images_path) as f:
            n, h, w = _idx_header(f, images_path, IDX_IMAGES_MAGIC, cfg.max_idx_mb * 2**20)
            if out is None:
                out = np.empty((len(refs), h, w, 1), np.uint8)
            mine = np.flatnonzero((refs >= start) & (refs < start + n))
            for i in mine[np.argsort(refs[mine], kind="stable")]:  # forward only: a gzip stream cannot go back
                f.seek(16 + int(refs[i] - start) * h * w)
                row = f.read(h * w)
                if len(row) < h * w:
                    raise DataError(f"{images_path}: truncated at image {refs[i] - start}; re-run the prepare stage")
                out[i, ..., 0] = np.frombuffer(row, np.uint8).reshape(h, w)
        start += n
    if len(refs) and (refs.min() < 0 or refs.max() >= start):
        raise DataError(f"{folder}: an image index is outside the {start} images there; re-run the prepare stage")
    return out


# ---------------------------------------------------------------- imagefolder


def _list_imagefolder(root: SourcePath) -> tuple[list[str], list[list[SourcePath]]]:
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


def _interleave(files: list[list[SourcePath]]) -> list[tuple[SourcePath, int]]:
    """(file, label) taking one file per class in turn, so any prefix (data.limit) covers every class."""
    out = []
    for i in range(max(len(f) for f in files)):
        out.extend((f[i], label) for label, f in enumerate(files) if i < len(f))
    return out


def _open_image(file: SourcePath, cfg: DataConfig) -> Image.Image:
    """Decode one image fully (load() catches truncation) after checking its size against data.max_pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # data.max_pixels is our limit
        with Image.open(file.read_image_file() if isinstance(file, ObjectPath) else file) as im:
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


CHECK_CHUNK = 1000  # image files one scan task checks


@dataclass(frozen=True)
class Checked:
    """One image file as the scan found it: its size (H, W) and colour once converted, its bytes' sha256; or the
    reason it cannot be read."""

    size: tuple[int, int] | None
    colour: bool
    sha256: str
    error: str | None = None


def check_images(root: SourcePath, names: list[str], cfg: DataConfig) -> list[Checked]:
    """Decode each of `names` (relative to `root`) once, converted and resized as the shards will hold it, and keep
    only what the scan needs."""
    out = []
    for name in names:
        try:  # decoded from the path: PIL's errors name it (the reasons go into prepare.json, byte-stable)
            arr = _to_array(_open_image(root / name, cfg), cfg.channels, cfg.image_size)
            digest = sha256_file(root / name)
        except _DECODE_ERRORS as exc:
            out.append(Checked(None, False, "", str(exc)))
            continue
        out.append(Checked(arr.shape[:2], arr.shape[2] == 3, digest))
    return out


def _checked(root: SourcePath, names: list[str], cfg: DataConfig, mapper: Mapper) -> Iterator[Checked]:
    """`check_images` of every name, in order: in chunks through `mapper` (Ray tasks in the prepare stage), or,
    with data.limit (a quick run), one image at a time here, so that the scan stops at the limit."""
    if cfg.limit is not None:
        return (check_images(root, [name], cfg)[0] for name in names)
    chunks = [names[i : i + CHECK_CHUNK] for i in range(0, len(names), CHECK_CHUNK)]
    return itertools.chain.from_iterable(mapper(functools.partial(check_images, root, cfg=cfg), chunks))


def _scan_imagefolder(cfg: DataConfig, mapper: Mapper = in_process) -> SourceIndex:
    """One sub-folder per class; every image decoded once to check it, then dropped; shape from data.image_size
    and data.channels (None: RGB if any image has colour)."""
    root = source_path(cfg.path)
    classes, files = _list_imagefolder(root)
    order = _interleave(files)
    names = [path.relative_to(root).as_posix() for path, _ in order]
    listed, refs, labels, skipped = [], [], [], []
    size, colour, digest = None, False, hashlib.sha256()
    for (path, label), name, checked in zip(order, names, _checked(root, names, cfg, mapper)):
        if cfg.limit is not None and len(refs) >= cfg.limit:
            break
        listed.append(name)
        if checked.error is not None:
            if cfg.on_error == "raise":
                raise DataError(f"{path}: cannot read image ({checked.error})")
            skipped.append({"file": str(path), "reason": checked.error})
            continue
        if size is not None and checked.size != size:
            raise DataError(
                f"{path}: size {checked.size[1]}x{checked.size[0]} differs from the first image's "
                f"{size[1]}x{size[0]}; set data.image_size to resize all"
            )
        size, colour = checked.size, colour or checked.colour
        digest.update(f"{name} {checked.sha256}\n".encode())
        refs.append(len(listed) - 1)
        labels.append(label)
    if not refs:
        raise DataError(f"{root}: no readable images ({len(skipped)} skipped)")
    shape = (*size, cfg.channels or (3 if colour else 1))
    refs_array, labels_array = np.asarray(refs, np.int64), np.asarray(labels, np.int64)
    return SourceIndex(refs_array, labels_array, None, None, classes, shape, digest.hexdigest(), listed, skipped)


def _read_files(root: SourcePath, files: list[str], shape: tuple[int, int, int], cfg: DataConfig) -> np.ndarray:
    """The images `files` (relative to `root`), converted and resized to `shape` as the scan found them."""
    out = np.empty((len(files), *shape), np.uint8)
    for i, name in enumerate(files):
        path = root / name
        try:
            arr = _to_array(_open_image(path, cfg), cfg.channels, cfg.image_size)
        except _DECODE_ERRORS as exc:
            raise DataError(f"{path}: cannot read image ({exc}); it changed since the prepare stage") from None
        if arr.shape[2] == 1 and shape[2] == 3:
            arr = np.repeat(arr, 3, axis=2)  # = PIL's L → RGB
        if arr.shape != tuple(shape):
            raise DataError(f"{path}: now {arr.shape}, prepared as {tuple(shape)}; re-run the prepare stage")
        out[i] = arr
    return out
