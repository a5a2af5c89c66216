"""Bad input files, corrupt or hostile checkpoints, and interrupted stages: one clear error, nothing half-written.

docs/reliability.md lists every fault the suite tries; the rows that no other test file covers are kept true here.
None of these start Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentzoo.checkpoint import (
    load_model,
    load_state,
    save_state,
    weights_record,
)
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


def _gzip(header: bytes, zeros: int) -> bytes:
    """gzip of an IDX header followed by `zeros` zero bytes, compressed a MB at a time (about 1000:1)."""
    import gzip

    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as f:
        f.write(header)
        for _ in range(zeros // 2**20):
            f.write(bytes(2**20))
    return buffer.getvalue()


def test_a_gzip_bomb_is_not_inflated(tmp_path):
    import tracemalloc

    bomb = tmp_path / "train-images-idx3-ubyte.gz"  # a 10 x 4 x 4 header followed by 512 MB of zeros
    bomb.write_bytes(
        _gzip(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 4, 4)), 512 * 2**20)
    )
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    with pytest.raises(DataError, match=r"idx3-ubyte\.gz: unexpected bytes after the \(10, 4, 4\) data"):
        read_idx(bomb, IDX_IMAGES_MAGIC)
    assert tracemalloc.get_traced_memory()[1] < 2**20  # read what the header declares + 1 byte, not 512 MB
    tracemalloc.stop()


def test_a_header_declaring_too_much_data_is_refused_before_reading(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    header = IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2**20, 100, 100))
    (idx / "train-images-idx3-ubyte.gz").write_bytes(_gzip(header, 2**20))  # declares 10 GB
    (idx / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(
        DataError,
        match=r"header declares \(1048576, 100, 100\) = 10485760000 bytes, more than "
        r"data\.max_idx_mb = 8192 MB \(a damaged header or a gzip bomb\?\)",
    ):
        load_source(DataConfig(source="idx", path=str(idx)))
    with pytest.raises(DataError, match=r"more than data\.max_idx_mb = 1 MB"):
        read_idx(idx / "train-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC, max_bytes=2**20)


def test_idx_images_larger_than_max_pixels_are_refused(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    images = IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 5, 6)) + bytes(60)
    (idx / "train-images-idx3-ubyte").write_bytes(images)
    (idx / "train-labels-idx1-ubyte").write_bytes((0x801).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes(2))
    with pytest.raises(DataError, match=r"images of 6x5 = 30 pixels exceed data\.max_pixels = 29"):
        load_source(DataConfig(source="idx", path=str(idx), max_pixels=29))


@pytest.mark.parametrize(
    "files, message",
    [
        (None, r"idx: data.path is not a directory"),
        ([], r"idx: no train-images-idx3-ubyte\[\.gz\] and train-labels-idx1-ubyte\[\.gz\] found"),
        (["train-images-idx3-ubyte"], r"idx: train-labels-idx1-ubyte\[\.gz\] is missing"),
        (
            ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"],
            r"idx: t10k-images-idx3-ubyte\[\.gz\] is missing",
        ),
    ],
)
def test_idx_folder_without_its_files(tmp_path, files, message):
    folder = tmp_path / "idx"
    valid = {
        "train-images-idx3-ubyte": bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 7]),
        "train-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 1, 3]),
    }  # one 1x1 image, label 3
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
    weights_file.write_bytes(
        {
            "zero-byte": b"",
            "truncated": data[: len(data) // 2],
            "random bytes": bytes(range(256)) * 4,
            "json": b'{"epoch": 3}',
        }[damage]
    )
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


def _vae_job(shards: Path, tiny_params, epochs: int):
    from latentzoo.training.job import training_data

    params = tiny_params(**{"train.epochs": epochs, "train.num_workers": 1})
    return training_data(params, "vae", shards).job(params, "vae")  # what the train stage ships to its workers


def _session(run_dir: Path, resume=None):
    """A one-process `Session` without Ray that keeps checkpoints as Ray does: <run>/checkpoint_00000N."""
    import ray.train

    from latentzoo.training.loop import Session

    def report(row, checkpoint=None):
        shutil.copytree(checkpoint.path, run_dir / f"checkpoint_{row['epoch']:06d}", dirs_exist_ok=True)

    return Session(0, 1, 1, lambda: resume, report, ray.train.Checkpoint, lambda m: m, torch.device("cpu"))


def test_a_corrupt_last_checkpoint_resumes_from_the_previous_one(digits_shards, tiny_params, tmp_path, capsys):
    import ray.train

    from latentzoo.checkpoint import CHECKPOINT_FILE
    from latentzoo.training.loop import run_loop

    run = tmp_path / "run"
    run.mkdir()
    run_loop(_vae_job(digits_shards, tiny_params, epochs=2), _session(run))
    good = load_state(run / "checkpoint_000001" / CHECKPOINT_FILE)
    latest = run / "checkpoint_000002" / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as by a full disk
    capsys.readouterr()

    run_loop(_vae_job(digits_shards, tiny_params, epochs=3), _session(run, ray.train.Checkpoint(latest.parent)))
    said = capsys.readouterr().out
    assert "warning: the last checkpoint is unusable" in said and "checkpoint_000002" in said
    assert "resuming from the previous one" in said and "resuming from the checkpoint of epoch 1" in said
    resumed = load_state(run / "checkpoint_000003" / CHECKPOINT_FILE)
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]  # epoch 2 trained again, epoch 1 not
    assert resumed["history"][0] == good["history"][0]


def test_no_readable_checkpoint_trains_from_the_start(digits_shards, tiny_params, tmp_path, capsys):
    import ray.train

    from latentzoo.checkpoint import CHECKPOINT_FILE
    from latentzoo.training.loop import run_loop

    run = tmp_path / "run"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / CHECKPOINT_FILE).write_bytes(b"")
    run_loop(
        _vae_job(digits_shards, tiny_params, epochs=1), _session(run, ray.train.Checkpoint(run / "checkpoint_000001"))
    )
    assert "no earlier checkpoint is readable: training from the start" in capsys.readouterr().out
    assert [row["epoch"] for row in load_state(run / "checkpoint_000001" / CHECKPOINT_FILE)["history"]] == [1]


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


def interactive_signals() -> None:
    """In the child, before exec: SIGINT as a terminal gives it. A shell running the suite as a background job
    ignores SIGINT, children inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_mid_write(out: Path, sig: int) -> subprocess.CompletedProcess:
    """Run DRIVER writing `out`, send `sig` once it is writing; its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LATENTZOO_DEBUG": ""},
        preexec_fn=interactive_signals,
    )
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


# `dvc repro` as far as the stage can tell: runs its command with `<shell> -c` in DVC's environment, then waits.
FAKE_DVC = """
import os, subprocess, sys
shell, driver, out = sys.argv[1:]
subprocess.run([shell, "-c", f"{sys.executable} {driver} {out}"], env={**os.environ, "DVC_STAGE": "prepare"})
"""


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_stops_when_dvc_dies_with_or_without_a_shell_between(tmp_path, shell):
    """DVC killed (a scheduler's SIGTERM or SIGKILL to it alone): the stage it runs stops as a SIGTERM would,
    whether the shell execs the command (bash) or stays between them (dash, Debian's /bin/sh)."""
    driver, out = tmp_path / "driver.py", tmp_path / "prepared"
    driver.write_text(DRIVER)
    dvc = subprocess.Popen(
        [sys.executable, "-c", FAKE_DVC, shell, str(driver), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LATENTZOO_DEBUG": ""},
    )
    try:
        assert dvc.stdout.readline() == "writing\n"
        dvc.kill()
        output, _ = dvc.communicate(timeout=30)  # until the stage, too, has closed the pipe
    finally:
        dvc.kill()
    assert output == "terminated: nothing was written under the final output names\n"
    assert [p.name for p in tmp_path.iterdir()] == ["driver.py"]  # no output, no temporary directory


def test_a_ray_address_with_no_head_is_one_line_within_seconds(digits_shards, tmp_path):
    """RAY_ADDRESS naming no listening head: one line and exit 2 within seconds (`ray.init` retries for a minute,
    then prints a traceback), before any output or MLflow run."""
    import time

    from conftest import ROOT

    from latentzoo.local_cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    stage = [sys.executable, str(ROOT / "pipelines/train.py"), "--params", str(ROOT / "params.yaml")]
    stage += ["--model", "vae", "--shards", str(digits_shards), "--out", str(tmp_path / "models/vae")]
    stage += ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p.csv")]
    env = {**os.environ, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    started = time.monotonic()
    done = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: RAY_ADDRESS={address}: no Ray head answers there (Connection refused); start the cluster (ray "
        "start --head, or make repro's local head) or unset RAY_ADDRESS to run on a local one"
    ]
    assert time.monotonic() - started < 60  # interpreter, torch and the shard check included
    assert not (tmp_path / "models").exists() and not (tmp_path / "m.json").exists()


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "64k"):
    """A real filesystem of `size` (tmpfs) at `where`, where this process may mount one (root); else None."""
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path / "small") as where:
        yield where


def test_a_full_disk_while_writing_shards_is_one_line(digits_shards, small_disk, tmp_path, monkeypatch):
    """The shard stage on a filesystem that fills up: one line naming the output and the space left, exit 2, and
    nothing left on the disk (the temporary folder removed). Without a mountable filesystem, an injected ENOSPC."""
    import errno

    from conftest import ROOT

    from latentzoo.data.shards import write_shards
    from latentzoo.errors import DiskFullError

    prepared = digits_shards.parent / "prepared"
    if small_disk is None:
        import webdataset

        def full(self, sample):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(webdataset.ShardWriter, "write", full)
        with pytest.raises(DiskFullError, match=r"shards: no space left on device while writing it \("):
            write_shards(prepared, tmp_path / "shards", maxcount=500, progress=False)
        assert not any(tmp_path.glob("*shards*"))
        return
    out = small_disk / "shards"
    stage = [sys.executable, str(ROOT / "pipelines/shard.py"), "--params", str(ROOT / "params.yaml")]
    done = subprocess.run([*stage, "--prepared", str(prepared), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]  # after the progress bar's
    assert "Traceback" not in done.stderr
    assert re.fullmatch(
        rf"error: {out}: no space left on device while writing it \([\d.]+ MiB free on its filesystem\); free some "
        r"space, or write it elsewhere",
        line,
    ), line
    assert list(small_disk.iterdir()) == []  # no shard, no temporary folder


GC_EXIT = """
import signal, sys, weakref
from latentzoo.errors import quiet_signal_exits

def sigterm_handler(signum, frame):  # what Ray installs in every worker
    raise SystemExit(1)

class Thing:
    pass

def stop_while_collecting(_):  # SIGTERM arrives while a weakref callback (a garbage collection) runs
    signal.raise_signal(signal.SIGTERM)

def broken(_):
    raise ValueError("a real bug in a callback")

signal.signal(signal.SIGTERM, sigterm_handler)
if sys.argv[1] == "quiet":
    quiet_signal_exits()
a, b = Thing(), Thing()
refs = [weakref.ref(a, stop_while_collecting), weakref.ref(b, broken)]
del a, b
print("still running")
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_a_worker_stopped_inside_a_gc_callback_prints_no_traceback(quiet):
    """Ray stops a worker with SIGTERM and its handler raises SystemExit; landing inside a weakref callback, Python
    reports it as 'Exception ignored … Traceback', which Ray forwards to the stage's console. The training loop's
    workers drop that report (`quiet_signal_exits`) and still report any other exception there."""
    mode = "quiet" if quiet else "default"
    done = subprocess.run([sys.executable, "-c", GC_EXIT, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still running" in done.stdout, done.stderr
    assert "ValueError: a real bug in a callback" in done.stderr
    assert ("SystemExit" in done.stderr) is not quiet, done.stderr
