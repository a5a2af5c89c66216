"""Sources (digits, idx, imagefolder), the stratified split and the prepare stage's outputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import latentzoo.data.prepare as prepare_mod
from latentzoo.atomic import atomic_dir, atomic_write_json
from latentzoo.config import DataConfig
from latentzoo.data.prepare import load_split, prepare, split_indices
from latentzoo.data.sources import load_source
from latentzoo.errors import DataError

# ---------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of uint8 `arr`: magic 0x000008<ndim>, big-endian dims, the data."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    """`<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)


def fake_mnist(n: int, seed: int = 0, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def save_image(path: Path, size: tuple[int, int], mode: str, value: int = 100, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 30)
    Image.new(mode, size, color).save(path, format=fmt)


def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 10, mode: str = "L", size=(5, 5)) -> Path:
    for c in classes:
        for i in range(per_class):
            save_image(root / c / f"{i:03d}.png", size, mode, value=10 * i)
    return root


def raiser(exc: BaseException):
    """A stand-in function that raises `exc` whatever it is called with."""

    def fn(*args, **kwargs):
        raise exc

    return fn


# ---------------------------------------------------------------- atomic helpers


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("boom")
    assert (final / "a").read_text() == "1"  # old result untouched
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ---------------------------------------------------------------- digits


def test_digits_source():
    data = load_source(DataConfig(source="digits"))
    assert data.train.images.shape == (1797, 8, 8, 1)
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int64
    assert data.train.images.min() == 0 and data.train.images.max() == 255
    assert data.classes == [str(i) for i in range(10)]
    assert data.test is None and data.skipped == []


def test_limit_keeps_first_images():
    full = load_source(DataConfig(source="digits"))
    data = load_source(DataConfig(source="digits", limit=50))
    np.testing.assert_array_equal(data.train.images, full.train.images[:50])


# ---------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source(tmp_path, gz):
    images, labels = fake_mnist(40)
    test_images, test_labels = fake_mnist(20, seed=1)
    write_idx(tmp_path, "train", images, labels, gz)
    write_idx(tmp_path, "t10k", test_images, test_labels, gz)
    data = load_source(DataConfig(source="idx", path=str(tmp_path)))
    assert data.train.images.shape == (40, 6, 6, 1) and data.train.images.dtype == np.uint8
    np.testing.assert_array_equal(data.train.images[..., 0], images)
    np.testing.assert_array_equal(data.train.labels, labels)
    np.testing.assert_array_equal(data.test.images[..., 0], test_images)
    assert data.classes == [str(i) for i in range(10)]


def test_idx_pools_test_files_without_keep_source_test(tmp_path):
    write_idx(tmp_path, "train", *fake_mnist(40), gz=True)
    write_idx(tmp_path, "t10k", *fake_mnist(20, seed=1), gz=True)
    data = load_source(DataConfig(source="idx", path=str(tmp_path), keep_source_test=False))
    assert data.test is None and len(data.train) == 60


def test_idx_without_t10k_has_no_test(tmp_path):
    write_idx(tmp_path, "train", *fake_mnist(40), gz=False)
    assert load_source(DataConfig(source="idx", path=str(tmp_path))).test is None


def test_idx_wrong_magic(tmp_path):
    images, labels = fake_mnist(20)
    write_idx(tmp_path, "train", images, labels, gz=False)
    # the labels file where the images file should be
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: .*magic"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    images, labels = fake_mnist(20)
    write_idx(tmp_path, "train", images, labels, gz=False)
    data = idx_bytes(images)[:-7]
    if gz:
        (tmp_path / "train-images-idx3-ubyte").unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    else:
        (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte(\.gz)?: truncated"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


def test_idx_corrupt_gzip(tmp_path):
    write_idx(tmp_path, "train", *fake_mnist(20), gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: corrupt gzip"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


def test_idx_count_mismatch(tmp_path):
    images, labels = fake_mnist(20)
    write_idx(tmp_path, "train", images, labels[:15], gz=False)
    with pytest.raises(DataError, match="20 images but .* 15 labels"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


def test_idx_test_label_unknown_to_train(tmp_path):
    images, labels = fake_mnist(20)
    write_idx(tmp_path, "train", images, labels % 5, gz=False)
    write_idx(tmp_path, "t10k", images, labels, gz=False)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: label 5"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_grey(tmp_path):
    image_folder(tmp_path, per_class=4)
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    data = load_source(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert data.classes == ["cat", "dog"]
    assert data.train.images.shape == (8, 5, 5, 1)
    assert sorted(data.train.labels.tolist()) == [0] * 4 + [1] * 4


def test_imagefolder_rgb_detection_and_resize(tmp_path):
    image_folder(tmp_path, per_class=3, size=(7, 5))
    save_image(tmp_path / "dog" / "colour.JPG", (9, 9), "RGB", fmt="JPEG")
    data = load_source(DataConfig(source="imagefolder", path=str(tmp_path), image_size=4))
    assert data.train.images.shape == (7, 4, 4, 3)
    grey = data.train.images[data.train.labels == 0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    forced = load_source(DataConfig(source="imagefolder", path=str(tmp_path), image_size=4, channels=1))
    assert forced.train.images.shape == (7, 4, 4, 1)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    image_folder(tmp_path, per_class=3)
    save_image(tmp_path / "dog" / "big.png", (6, 6), "L")
    with pytest.raises(DataError, match=r"big\.png: size 6x6 .*data\.image_size"):
        load_source(DataConfig(source="imagefolder", path=str(tmp_path)))


def test_imagefolder_empty_class(tmp_path):
    image_folder(tmp_path, per_class=3)
    (tmp_path / "emu").mkdir()
    with pytest.raises(DataError, match="emu: class folder has no images"):
        load_source(DataConfig(source="imagefolder", path=str(tmp_path)))


def _corrupt_png(path: Path) -> None:
    save_image(path, (5, 5), "L")
    path.write_bytes(path.read_bytes()[:40])  # truncated mid-stream


def test_imagefolder_corrupt_raises(tmp_path):
    image_folder(tmp_path, per_class=3)
    _corrupt_png(tmp_path / "dog" / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read image"):
        load_source(DataConfig(source="imagefolder", path=str(tmp_path)))


def test_imagefolder_too_many_pixels(tmp_path):
    image_folder(tmp_path, per_class=3)
    with pytest.raises(DataError, match="decompression bomb"):
        load_source(DataConfig(source="imagefolder", path=str(tmp_path), max_pixels=24))


def test_imagefolder_corrupt_skipped_and_recorded(tmp_path):
    image_folder(tmp_path / "src", per_class=10)
    _corrupt_png(tmp_path / "src" / "dog" / "bad.png")
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "src"), on_error="skip")
    info = prepare(cfg, seed=0, out_dir=tmp_path / "out")
    assert info["skipped"]["count"] == 1 and info["skipped"]["files"][0]["file"].endswith("bad.png")
    assert sum(info["counts"].values()) == 20
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["skipped"] == info["skipped"]


def test_imagefolder_limit_covers_every_class(tmp_path):
    image_folder(tmp_path, classes=("a", "b", "c"), per_class=10)
    data = load_source(DataConfig(source="imagefolder", path=str(tmp_path), limit=12))
    assert np.bincount(data.train.labels).tolist() == [4, 4, 4]


# ---------------------------------------------------------------- split


def test_split_deterministic_disjoint_covering():
    labels = np.repeat(np.arange(5), 40)
    a = split_indices(labels, 0.1, 0.2, seed=3)
    b = split_indices(labels, 0.1, 0.2, seed=3)
    c = split_indices(labels, 0.1, 0.2, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(together) == 200 and np.array_equal(np.sort(together), np.arange(200))
    assert [len(a[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    assert all(np.array_equal(a[k], np.sort(a[k])) for k in a)


def test_split_is_stratified():
    labels = np.concatenate([np.zeros(800), np.ones(200)]).astype(np.int64)
    parts = split_indices(labels, 0.1, 0.2, seed=0)
    for idx in parts.values():
        assert abs(labels[idx].mean() - 0.2) < 0.01


def test_split_without_test_fraction():
    parts = split_indices(np.arange(100) % 10, 0.1, None, seed=0)
    assert sorted(parts) == ["train", "val"] and len(parts["val"]) == 10


def test_split_falls_back_with_tiny_class():
    labels = np.array([0] * 30 + [1])
    with pytest.warns(UserWarning, match="not stratified"):
        parts = split_indices(labels, 0.1, 0.2, seed=0)
    assert sum(len(v) for v in parts.values()) == 31


def test_split_too_few_images():
    with pytest.raises(DataError, match="too few"):
        split_indices(np.array([0, 1]), 0.4, 0.4, seed=0)


# ---------------------------------------------------------------- prepare


def test_prepare_writes_an_index_of_every_split(tmp_path):
    """No pixels: each split's refs (rows of the source) and labels; the images are read back from the source."""
    out = tmp_path / "prepared"
    info = prepare(DataConfig(source="digits"), seed=0, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["index.npz", "prepare.json"]
    assert info == json.loads((out / "prepare.json").read_text())
    assert info["image_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert sum(info["counts"].values()) == 1797
    source = load_source(DataConfig(source="digits"))
    with np.load(out / "index.npz") as f:
        refs = [f[f"{split}_refs"] for split in ("train", "val", "test")]
        assert sorted(np.concatenate(refs).tolist()) == list(range(1797))  # disjoint, covering
        for split in ("train", "val", "test"):
            labels = f[f"{split}_labels"]
            assert labels.dtype == np.int64 and len(labels) == info["counts"][split]
            assert np.bincount(labels, minlength=10).tolist() == info["class_counts"][split]
            np.testing.assert_array_equal(labels, source.train.labels[f[f"{split}_refs"]])
            split_set = load_split(out, split)
            np.testing.assert_array_equal(split_set.images, source.train.images[f[f"{split}_refs"]])


def test_prepare_records_a_digest_of_the_source_that_changes_with_one_image(tmp_path):
    root = image_folder(tmp_path / "folder", per_class=20)
    first = prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "a")
    save_image(root / "cat" / "000.png", (5, 5), "L", value=101)
    second = prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "b")
    assert first["counts"] == second["counts"] and first["source_sha256"] != second["source_sha256"]


def test_prepare_is_byte_identical(tmp_path):
    cfg = DataConfig(source="digits", limit=300)
    prepare(cfg, seed=1, out_dir=tmp_path / "a")
    prepare(cfg, seed=1, out_dir=tmp_path / "b")
    for name in ("index.npz", "prepare.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_prepare_uses_source_test_split(tmp_path):
    write_idx(tmp_path / "idx", "train", *fake_mnist(100), gz=True)
    write_idx(tmp_path / "idx", "t10k", *fake_mnist(30, seed=1), gz=True)
    info = prepare(DataConfig(source="idx", path=str(tmp_path / "idx")), seed=0, out_dir=tmp_path / "out")
    assert info["counts"] == {"train": 90, "val": 10, "test": 30}


def test_prepare_failure_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "prepared"

    def fail(path, **arrays):
        if path.name == "index.npz":
            raise OSError("disk full")
        np.savez(path, **arrays)

    monkeypatch.setattr(prepare_mod, "save_npz", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(DataConfig(source="digits", limit=100), seed=0, out_dir=out)
    assert list(tmp_path.iterdir()) == []


def test_prepare_failure_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare(DataConfig(source="digits", limit=100), seed=0, out_dir=out)
    before = (out / "prepare.json").read_bytes()
    monkeypatch.setattr(prepare_mod, "save_npz", raiser(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare(DataConfig(source="digits", limit=200), seed=0, out_dir=out)
    assert (out / "prepare.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
