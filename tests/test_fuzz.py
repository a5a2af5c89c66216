"""Fuzzing the readers of user input (IDX files, image folders, params.yaml) with hypothesis.

The property: every call either succeeds or raises a LatentzooError (ConfigError, DataError, ...) whose message names
the file or folder (or the split too few images cannot fill); never any other exception, which a stage would print
as a traceback. Inputs are random bytes and
valid files with random edits (truncated, bytes flipped or inserted, header fields replaced). Each test tries few
examples so the file stays fast; `LATENTZOO_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py` searches longer.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, example, given, settings
from PIL import Image

from latentzoo.config import DataConfig, Params, load_params, validate_params
from latentzoo.data.prepare import load_prepared, prepare
from latentzoo.data.sources import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_source, read_idx
from latentzoo.errors import ConfigError, DataError, LatentzooError
from latentzoo.models import REGISTRY

EXAMPLES = int(os.environ.get("LATENTZOO_FUZZ_EXAMPLES", "40"))
# No example database: nothing is written into the checkout (.hypothesis/), and every run draws afresh.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, *args, **kwargs):
    """fn's result, or the LatentzooError it raised; any other exception propagates and fails the test."""
    try:
        return fn(*args, **kwargs)
    except LatentzooError as err:
        assert str(err), "a LatentzooError must say what went wrong"
        return err


# ---------------------------------------------------------------- byte-level edits

U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 255, 2**16, 2**31, 2**32 - 1]))


def mutate(draw, data: bytes, max_edits: int = 3) -> bytes:
    """`data` with 1..max_edits random edits: truncated, a byte flipped, bytes inserted or appended."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
        pos = draw(st.integers(0, len(out)))
        if op == "truncate":
            del out[pos:]
        elif op == "flip" and pos < len(out):
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            out += draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


# ---------------------------------------------------------------- IDX files


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of uint8 `arr`: magic 0x000008<ndim>, big-endian dims, the data."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@st.composite
def idx_file(draw, ndim: int) -> bytes:
    """An IDX file of `ndim` dims, valid or with its magic, a dim or its bytes changed (then maybe gzipped)."""
    shape = draw(st.tuples(*[st.integers(0, 5) for _ in range(ndim)]))
    size = int(np.prod(shape))
    pixels = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).reshape(shape)
    data = idx_bytes(pixels)
    edit = draw(st.sampled_from(["none", "magic", "dim", "bytes"]))
    if edit == "magic":
        magic = draw(st.one_of(st.sampled_from([IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, 0x0802, 0x0903, 0x0D03]), U32))
        data = magic.to_bytes(4, "big") + data[4:]
    elif edit == "dim":
        k = draw(st.integers(0, ndim - 1))
        data = data[: 4 + 4 * k] + draw(U32).to_bytes(4, "big") + data[8 + 4 * k :]
    elif edit == "bytes":
        data = mutate(draw, data)
    return data


@st.composite
def stored(draw, data: st.SearchStrategy[bytes]) -> tuple[bytes, bool]:
    """(bytes as written to disk, gzipped?): raw, gzipped, or gzipped and then damaged."""
    raw = draw(data)
    how = draw(st.sampled_from(["raw", "gzip", "damaged gzip"]))
    if how == "raw":
        return raw, False
    packed = gzip.compress(raw, mtime=0)
    return (packed if how == "gzip" else mutate(draw, packed)), True


@FUZZ
@given(
    file=stored(st.one_of(st.binary(max_size=64), idx_file(3), idx_file(1))),
    magic=st.sampled_from([IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC]),
)
def test_read_idx_never_crashes(file, magic):
    data, gz = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("file-idx-ubyte" + (".gz" if gz else ""))
        path.write_bytes(data)
        result = outcome(read_idx, path, magic)
    if isinstance(result, LatentzooError):
        assert isinstance(result, DataError) and str(path) in str(result)
    else:
        assert result.dtype == np.uint8 and result.ndim == (magic & 0xFF)


@FUZZ
@given(
    train=st.tuples(stored(idx_file(3)), stored(idx_file(1))),
    t10k=st.none() | st.tuples(stored(idx_file(3)), stored(idx_file(1))),
    keep_source_test=st.booleans(),
)
@example(  # a valid pair large enough to split: the success branch runs every time, not only when drawn
    train=(
        (idx_bytes(np.arange(160).reshape(40, 2, 2) % 256), False),
        (gzip.compress(idx_bytes(np.arange(40) % 2)), True),
    ),
    t10k=None,
    keep_source_test=False,
)
def test_idx_folder_prepares_or_names_the_problem(train, t10k, keep_source_test):
    """Through the prepare stage: clear error and nothing written, or splits of real (non-empty) images."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "idx", Path(tmp) / "prepared"
        folder.mkdir()
        for prefix, pair in (("train", train), ("t10k", t10k)):
            for kind, (data, gz) in zip(("images-idx3", "labels-idx1"), pair or ()):
                (folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}").write_bytes(data)
        cfg = DataConfig(source="idx", path=str(folder), keep_source_test=keep_source_test)
        result = outcome(prepare, cfg, seed=0, out_dir=out)
        if isinstance(result, LatentzooError):
            # the file or folder, or the split that too few images cannot fill
            assert isinstance(result, DataError) and (str(folder) in str(result) or str(result).startswith("split:"))
            assert not out.exists()  # nothing under the final name
            return
        c, h, w = result["image_shape"]
        assert c == 1 and h >= 1 and w >= 1
        for split, counts in result["class_counts"].items():
            assert len(counts) == result["num_classes"]  # every label indexes a class
            labels = load_prepared(out).labels[split]
            assert len(labels) == sum(counts) and labels.min() >= 0 and labels.max() < result["num_classes"]


def test_idx_header_whose_size_overflows_int64(tmp_path):
    """2^31 x 2^31 x 4 = 2^64 bytes wraps to 0 in int64 arithmetic: it must not pass for an empty payload."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: header declares .* = 18446744073709551616 bytes"):
        read_idx(path, IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("shape", [(3, 0, 0), (3, 4, 0), (3, 0, 4)])
def test_idx_images_without_pixels(tmp_path, shape):
    """0-pixel images passed prepare and then crashed the shard stage's PNG encoder."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(shape, np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: images of \d+x\d+ pixels"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))


# ---------------------------------------------------------------- image folders

# Leading bytes that make PIL hand a file to one of its decoders (PNG, JPEG, GIF, BMP, PNM, TIFF, WebP, ICO, PSD,
# DDS, ICNS, QOI, JPEG 2000, PCX, SGI, Sun raster, XBM, XPM, EPS), so random tails reach the parsers behind them.
FORMAT_MAGICS = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"P1\n",
    b"P2\n",
    b"P4\n",
    b"P5\n",
    b"P6\n",
    b"P7\n",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"\x00\x00\x01\x00",
    b"\x00\x00\x02\x00",
    b"8BPS\x00\x01",
    b"DDS |\x00\x00\x00",
    b"icns",
    b"qoif",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"\xff\x4f\xff\x51",
    b"\x0a\x05\x01\x08",
    b"\x01\xda",
    b"\x59\xa6\x6a\x95",
    b"#define im_width 4\n",
    b"/* XPM */\n",
    b"%!PS-Adobe-3.0",
]
PNG_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]
JPEG_MODES = ["L", "RGB", "CMYK"]


@st.composite
def valid_image(draw) -> bytes:
    """A small PNG or JPEG of random pixels in one of the modes PIL writes for that format."""
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(PNG_MODES if fmt == "PNG" else JPEG_MODES))
    w, h = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rgb = Image.frombytes("RGB", (w, h), draw(st.binary(min_size=3 * w * h, max_size=3 * w * h)))
    im = rgb.convert("L").convert("I").convert(mode) if mode == "I;16" else rgb.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def damaged_image(draw) -> bytes:
    """A valid PNG or JPEG, truncated or with bytes flipped or inserted."""
    return mutate(draw, draw(valid_image()))


IMAGE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(FORMAT_MAGICS), st.binary(max_size=96)),
    valid_image(),
    damaged_image(),
)


def folder_with(root: Path, name: str, data: bytes) -> Path:
    """Two classes of one valid 4x4 grey PNG each; `data` saved as `a/<name>` beside the first."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (4, 4), 100).save(root / cls / "0.png")
    (root / "a" / name).write_bytes(data)
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt metadata it skips
@FUZZ
@given(
    data=IMAGE_BYTES,
    name=st.sampled_from(["x.png", "x.jpg", "x.jpeg", "x.PNG"]),
    on_error=st.sampled_from(["raise", "skip"]),
    channels=st.sampled_from([None, 1, 3]),
    image_size=st.sampled_from([None, 4, 7]),
    max_pixels=st.sampled_from([16, 100, 16_000_000]),
)
def test_image_folder_never_crashes(data, name, on_error, channels, image_size, max_pixels):
    with tempfile.TemporaryDirectory() as tmp:
        root = folder_with(Path(tmp) / "images", name, data)
        cfg = DataConfig(
            source="imagefolder",
            path=str(root),
            on_error=on_error,
            channels=channels,
            image_size=image_size,
            max_pixels=max_pixels,
        )
        result = outcome(load_source, cfg)
    if isinstance(result, LatentzooError):
        assert isinstance(result, DataError) and str(root) in str(result)
        return
    images, labels = result.train.images, result.train.labels
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] in (1, 3)
    assert images.shape[1] >= 1 and images.shape[2] >= 1 and len(images) == len(labels)
    assert set(labels.tolist()) <= {0, 1} and result.classes == ["a", "b"]
    assert len(images) + len(result.skipped) == 3  # every file is either read or recorded as skipped
    assert all(s["file"] == str(root / "a" / name) and s["reason"] for s in result.skipped)


# ---------------------------------------------------------------- params.yaml

SECTIONS = sorted(Params.model_fields)
KEYS = sorted(
    {
        k
        for s in Params.model_fields.values()
        if hasattr(s.annotation, "model_fields")
        for k in s.annotation.model_fields
    }
    | set(SECTIONS)
)
MODEL_NAMES = st.one_of(st.sampled_from(sorted(REGISTRY)), st.text(max_size=8))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-3, 3),
    st.floats(),
    st.floats(-2, 2),
    st.text(max_size=10),
    st.sampled_from(["digits", "idx", "imagefolder", "raise", "skip", "cosine", "optuna", "1e-3", "ten"]),
)
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-2, 2), st.none(), st.booleans())
YAMLISH = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3), max_leaves=8
)


REPO_PARAMS = (ROOT / "params.yaml").read_text()


def repo_params() -> dict:
    return yaml.safe_load(REPO_PARAMS)


@st.composite
def mutated_params(draw) -> dict:
    """The repo's params.yaml with 1-3 edits: a value replaced, a key removed or added, models or tune.space changed."""
    raw = repo_params()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "delete", "add", "models", "space", "section"]))
        section = draw(st.sampled_from(SECTIONS))
        node = raw.get(section)
        if op == "set" and isinstance(node, dict) and node:
            node[draw(st.sampled_from(list(node)))] = draw(YAMLISH)
        elif op == "delete" and isinstance(node, dict) and node:
            del node[draw(st.sampled_from(list(node)))]
        elif op == "add":
            target = node if isinstance(node, dict) else raw
            target[draw(KEY)] = draw(YAMLISH)
        elif op == "models":
            raw["models"] = draw(st.lists(MODEL_NAMES, max_size=3) | YAMLISH)
        elif op == "space":
            ranges = st.dictionaries(st.sampled_from(["low", "high", "log", "mid"]), SCALARS, max_size=3)
            raw["tune"] = raw["tune"] if isinstance(raw.get("tune"), dict) else {}
            raw["tune"]["space"] = draw(
                st.dictionaries(
                    MODEL_NAMES,
                    st.dictionaries(
                        st.sampled_from(["beta", "decay", "latent_dim", "x"]), ranges | YAMLISH, max_size=2
                    ),
                    max_size=2,
                )
                | YAMLISH
            )
        else:
            raw[section] = draw(YAMLISH)
    return raw


def check_params(result, source: str) -> None:
    if isinstance(result, LatentzooError):
        assert isinstance(result, ConfigError) and str(result).startswith(f"{source}: ")
    else:
        assert isinstance(result, Params)


@FUZZ
@given(raw=st.one_of(YAMLISH, st.dictionaries(KEY, YAMLISH, max_size=4), mutated_params()))
def test_validate_params_never_crashes(raw):
    check_params(outcome(validate_params, raw), "params")


@FUZZ
@given(raw=mutated_params(), style=st.sampled_from(["block", "flow"]), cut=st.none() | st.integers(0, 4000))
def test_load_params_from_mutated_yaml_never_crashes(raw, style, cut):
    text = yaml.safe_dump(raw, default_flow_style=style == "flow", allow_unicode=True, sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text if cut is None else text[:cut], encoding="utf-8")
        check_params(outcome(load_params, path), str(path))


YAML_TOKENS = st.sampled_from(
    [
        ":",
        " ",
        "\n",
        "  ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "#",
        "&a ",
        "*a",
        "!!",
        "!!python/object:os.system ",
        "!!binary ",
        "!!set ",
        "!!timestamp ",
        "? ",
        "|",
        ">",
        "'",
        '"',
        "\t",
        "%YAML 1.1\n",
        "---\n",
        "...\n",
        "1e3",
        "!!int ",
        "!!float ",
        "!!bool ",
        ".inf",
        "0x1F",
        "0b",
        "~",
        "train",
        "lr",
        "models",
        "vae",
        "-1",
        "2001-12-14",
        "2001-13-45",
        "\\",
        "\x00",
        "\ufeff",
        "é",
    ]
)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=64),
        st.lists(YAML_TOKENS, max_size=40).map(lambda tokens: "".join(tokens).encode("utf-8")),
        # nested lists, closed or not, up to deeper than the YAML parser can recurse (about 700 levels)
        st.builds(
            lambda depth, close: b"train: " + b"[" * depth + b"]" * (depth if close else 0),
            st.integers(1, 1500),
            st.booleans(),
        ),
    )
)
def test_load_params_from_random_bytes_never_crashes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(data)
        check_params(outcome(load_params, path), str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"train:\n  lr: \xff\xfe\n", "not UTF-8 text"),
        (b"train: " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
        (b"seed: 2001-13-45\n", r"a value does not fit its YAML type \(ValueError: month must be in 1..12\)"),
        (b"seed: !!int x\n", "a value does not fit its YAML type"),
        (b"seed: !!timestamp\n", "a value does not fit its YAML type"),
    ],
)
def test_params_file_that_is_not_yaml_text(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {message}"):
        load_params(path)


def test_params_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: cannot read the params file"):
        load_params(tmp_path)
