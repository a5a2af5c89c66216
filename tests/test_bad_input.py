"""Bad input files, corrupt or hostile checkpoints, and interrupted stages: one clear error, nothing half-written.

docs/reliability.md lists every fault the suite tries; the rows that no other test file covers are kept true here.
None of these start Ray.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentzoo.config import DataConfig
from latentzoo.data.prepare import prepare
from latentzoo.data.shards import verify_shards, write_shards
from latentzoo.data.sources import IDX_IMAGES_MAGIC, load_source, read_idx
from latentzoo.errors import (
    EXIT_USER_ERROR,
    DataError,
    LatentzooError,
    ShardError,
    cli_errors,
)
from latentzoo.models import build_model
from latentzoo.training.checkpoint import (
    load_model,
    load_state,
    save_state,
    weights_record,
)

# ---------------------------------------------------------------- image files


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (200, 10, 30)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_IMAGES = {
    "zero-byte": ("bad.png", b""),
    "text named .png": ("bad.png", b"not an image, just text\n"),
    "html named .jpg": ("bad.jpg", b"<!doctype html><title>404 Not Found</title>"),
    "truncated jpeg": ("bad.jpg", jpeg_bytes()[:60]),
}


def folder_with(root: Path, name: str, data: bytes, per_class: int = 10) -> Path:
    """Two classes of ten 5x5 grey PNGs, and `data` saved as `b/<name>`."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (5, 5), 20 * i).save(root / cls / f"{i}.png")
    (root / "b" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_unreadable_image_is_named(tmp_path, kind):
    name, data = BAD_IMAGES[kind]
    root = folder_with(tmp_path / "images", name, data)
    with pytest.raises(DataError, match=rf"b/{name}: cannot read image"):
        prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()  # nothing under the final name


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_unreadable_image_is_skipped_and_recorded(tmp_path, kind):
    name, data = BAD_IMAGES[kind]
    root = folder_with(tmp_path / "images", name, data)
    cfg = DataConfig(source="imagefolder", path=str(root), on_error="skip")
    info = prepare(cfg, seed=0, out_dir=tmp_path / "prepared")
    assert sum(info["counts"].values()) == 20
    assert [s["file"] for s in info["skipped"]["files"]] == [str(root / "b" / name)]
    assert json.loads((tmp_path / "prepared" / "prepare.json").read_text())["skipped"]["count"] == 1


def test_a_folder_of_nothing_but_bad_images(tmp_path):
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"images: no readable images \(2 skipped\)"):
        load_source(DataConfig(source="imagefolder", path=str(root), on_error="skip"))


def test_zero_byte_idx_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: too short for an IDX header \(0 bytes\)"):
        read_idx(path, IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("files, message", [
    (None, r"idx: data.path is not a directory"),
    ([], r"idx: no train-images-idx3-ubyte\[\.gz\] and train-labels-idx1-ubyte\[\.gz\] found"),
    (["train-images-idx3-ubyte"], r"idx: train-labels-idx1-ubyte\[\.gz\] is missing"),
    (["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"],
     r"idx: t10k-images-idx3-ubyte\[\.gz\] is missing"),
])
def test_idx_folder_without_its_files(tmp_path, files, message):
    folder = tmp_path / "idx"
    valid = {"train-images-idx3-ubyte": bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 7]),
             "train-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 1, 3])}  # one 1x1 image, label 3
    if files is not None:
        folder.mkdir()
        for name in files:
            (folder / name).write_bytes(valid.get(name, b""))
    with pytest.raises(DataError, match=message):
        load_source(DataConfig(source="idx", path=str(folder)))


# ---------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Digits, 300 images in shards of 50: 210 train (5 shards), 30 val, 60 test."""
    base = tmp_path_factory.mktemp("small")
    prepare(DataConfig(source="digits", limit=300), seed=0, out_dir=base / "prepared")
    write_shards(base / "prepared", base / "shards", maxcount=50, progress=False)
    return base / "shards"


@pytest.fixture
def shards_copy(small_shards, tmp_path) -> Path:
    shutil.copytree(small_shards, tmp_path / "shards")
    return tmp_path / "shards"


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "garbage"])
def test_a_damaged_shard_fails_its_checksum(shards_copy, damage):
    tar = shards_copy / "train-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes({"truncated": data[: len(data) // 2], "zero-byte": b"", "garbage": b"junk" * 1000}[damage])
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256 mismatch with manifest\.json"):
        verify_shards(shards_copy)


def test_a_changed_shard_stops_training_before_ray_starts(shards_copy, tiny_params, tmp_path):
    from latentzoo.training.trainer import TrainOutputs, train_model

    tar = shards_copy / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    params = tiny_params(**{"train.num_workers": 1, "ray.storage_path": str(tmp_path / "ray")})
    outputs = TrainOutputs(tmp_path / "models/vae", tmp_path / "metrics/vae.json", tmp_path / "plots/vae.csv")
    with pytest.raises(ShardError, match=r"val-000000\.tar: sha256 mismatch"):
        train_model(params, "vae", shards_copy, outputs, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no Ray run, model, metrics or plots


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def weights_file(tmp_path, tiny_params) -> Path:
    params = tiny_params()
    model = build_model("vae", params.vae, (1, 8, 8))
    path = tmp_path / "model.pt"
    save_state(path, weights_record(model, "vae", params.vae.model_dump(), (1, 8, 8), epoch=1))
    return path


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "random bytes", "json"])
def test_corrupt_checkpoint_is_a_clear_error(weights_file, damage):
    data = weights_file.read_bytes()
    weights_file.write_bytes({"zero-byte": b"", "truncated": data[: len(data) // 2],
                              "random bytes": bytes(range(256)) * 4, "json": b'{"epoch": 3}'}[damage])
    with pytest.raises(LatentzooError, match=r"model\.pt: not a readable latentzoo checkpoint"):
        load_model(weights_file)


def test_missing_checkpoint_and_unknown_family(weights_file, tmp_path):
    with pytest.raises(LatentzooError, match=r"nope\.pt: checkpoint not found"):
        load_state(tmp_path / "nope.pt")
    record = load_state(weights_file)
    save_state(weights_file, {**record, "model_name": "gan"})
    with pytest.raises(LatentzooError, match="model.pt: unknown model family 'gan'"):
        load_model(weights_file)


def _write_marker(path: str) -> None:
    Path(path).write_text("code ran at load time")


class Payload:
    """Unpickling this calls _write_marker: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"model_name": "vae", "state_dict": {}, "payload": Payload(marker)}, path)
    with pytest.raises(LatentzooError, match=r"model\.pt: not a readable latentzoo checkpoint \(UnpicklingError"):
        load_model(path)
    assert not marker.exists()  # weights_only=True refused the global before calling it


# ---------------------------------------------------------------- entry points and interruption


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("LATENTZOO_DEBUG", raising=False)

    @cli_errors
    def main():
        raise DataError("data/x.png: cannot read image (truncated)")

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "error: data/x.png: cannot read image (truncated)\n"
    monkeypatch.setenv("LATENTZOO_DEBUG", "1")  # the traceback on request
    with pytest.raises(DataError):
        main()


# A stage entry point (cli_errors) writing its output through atomic_dir, paused mid-write so a signal lands there.
DRIVER = """
import sys, time
from pathlib import Path
from latentzoo.atomic import atomic_dir
from latentzoo.errors import cli_errors

@cli_errors
def main():
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "train.npz").write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(60)

main()
"""


def interrupt_mid_write(out: Path, sig: int) -> subprocess.CompletedProcess:
    """Run DRIVER writing `out`, send `sig` once it is writing; its exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LATENTZOO_DEBUG": ""})
    try:
        assert proc.stdout.readline() == "writing\n", proc.stderr.read()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigint_mid_write_exits_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "prepared"
    done = interrupt_mid_write(out, signal.SIGINT)
    assert done.returncode == 130
    assert done.stderr == "interrupted: nothing was written under the final output names\n"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_sigterm_mid_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train.npz").write_bytes(b"previous run")
    done = interrupt_mid_write(out, signal.SIGTERM)
    assert done.returncode == 143  # 128 + SIGTERM, after clean-up
    assert done.stderr == "terminated: nothing was written under the final output names\n"
    assert [p.name for p in out.iterdir()] == ["train.npz"] and (out / "train.npz").read_bytes() == b"previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # the temporary directory is removed
