"""WebDataset shards: round trip, manifest, byte-identical output, verification and atomic writing."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import latentzoo.data.shards as shards_mod
from latentzoo.config import DataConfig
from latentzoo.data.loader import iter_keyed
from latentzoo.data.prepare import load_split, prepare
from latentzoo.data.shards import encode_array, load_manifest, shard_urls, verify_shards, write_shards
from latentzoo.errors import DataError, ShardError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Digits, 300 images: 210 train / 30 val / 60 test."""
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(DataConfig(source="digits", limit=300), seed=0, out_dir=out)
    return out


@pytest.fixture(scope="module")
def prepared_rgb(tmp_path_factory) -> Path:
    """A 3-channel image folder, 2 classes of 12."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "src" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / "src" / c / f"{i}.png")
    prepare(DataConfig(source="imagefolder", path=str(root / "src")), seed=0, out_dir=root / "prepared")
    return root / "prepared"


def read_back(urls: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images NHWC, labels, block keys) as a plain WebDataset reader sees them (its own .npy decoder)."""
    images, labels, keys = [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        images.append(sample["images.npy"])
        labels.append(sample["labels.npy"])
        keys.append(sample["__key__"])
    return np.concatenate(images), np.concatenate(labels), keys


def raiser(exc: BaseException):
    """A stand-in function that raises `exc` whatever it is called with."""

    def fn(*args, **kwargs):
        raise exc

    return fn


@pytest.mark.parametrize("which", ["prepared", "prepared_rgb"])
def test_round_trip(request, tmp_path, which):
    src = request.getfixturevalue(which)
    manifest = write_shards(src, tmp_path / "shards", maxcount=50, progress=False)
    for split in ("train", "val", "test"):
        images, labels, keys = read_back(shard_urls(tmp_path / "shards", manifest, split))
        expected = load_split(src, split)
        np.testing.assert_array_equal(images, expected.images)
        np.testing.assert_array_equal(labels, expected.labels)
        assert keys == [f"{split}-{i:07d}" for i in range(0, len(labels), 50)]  # a block per shard: its first key


def test_manifest(prepared, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(prepared, out, maxcount=50, progress=False)
    assert load_manifest(out) == manifest
    assert (out / "manifest.json").read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    info = json.loads((prepared / "prepare.json").read_text())
    assert manifest["image_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["prepared"] == hashlib.sha256((prepared / "prepare.json").read_bytes()).hexdigest()
    for split, entry in manifest["splits"].items():
        assert entry["count"] == info["counts"][split] == sum(s["count"] for s in entry["shards"])
        for shard in entry["shards"]:
            path = out / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            with tarfile.open(path) as tar:  # one block: .images.npy + .labels.npy (50 digits fit one block)
                assert len(tar.getnames()) == 2
    names = sorted(p.name for p in out.iterdir())
    listed = sorted(s["name"] for e in manifest["splits"].values() for s in e["shards"])
    assert names == sorted(listed + ["manifest.json"])


def test_maxcount_respected(prepared, tmp_path):
    manifest = write_shards(prepared, tmp_path / "shards", maxcount=64, progress=False)
    train = manifest["splits"]["train"]["shards"]
    assert [s["count"] for s in train] == [64, 64, 64, 18]
    assert [s["name"] for s in train] == [f"train-{i:06d}.tar" for i in range(4)]


def test_byte_identical(prepared, tmp_path):
    a = write_shards(prepared, tmp_path / "a", maxcount=100, progress=False)
    b = write_shards(prepared, tmp_path / "b", maxcount=100, progress=False)
    assert a == b
    for shard in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()


def test_verify_detects_changed_byte(prepared, tmp_path):
    out = tmp_path / "shards"
    write_shards(prepared, out, maxcount=50, progress=False)
    verify_shards(out)
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    verify_shards(out, splits=["val", "test"])  # other splits still fine
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256 mismatch with manifest\.json"):
        verify_shards(out)


def test_verify_detects_missing_shard(prepared, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(prepared, out, maxcount=50, progress=False)
    (out / "test-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"test-000000\.tar: .*missing"):
        verify_shards(out, manifest)


def test_manifest_errors(prepared, tmp_path):
    with pytest.raises(ShardError, match="manifest.json: shard manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: unreadable"):
        load_manifest(tmp_path)
    manifest = write_shards(prepared, tmp_path / "shards", maxcount=500, progress=False)
    with pytest.raises(ShardError, match="no split 'dev'"):
        shard_urls(tmp_path / "shards", manifest, "dev")


def test_shard_urls_absolute_in_order(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_shards(prepared, Path("shards"), maxcount=50, progress=False)
    urls = shard_urls(Path("shards"), manifest, "train")
    assert urls == [str(tmp_path / "shards" / f"train-{i:06d}.tar") for i in range(5)]


def test_interrupted_write_leaves_nothing(prepared, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards_mod.encode_array

    def flaky(array):
        calls["n"] += 1
        if calls["n"] == 6:  # midway through train (images + labels per shard), after two shards were closed
            raise KeyboardInterrupt
        return real(array)

    monkeypatch.setattr(shards_mod, "encode_array", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(prepared, tmp_path / "shards", maxcount=50, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_previous_shards(prepared, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    before = write_shards(prepared, out, maxcount=50, progress=False)
    monkeypatch.setattr(shards_mod, "sha256_file", raiser(OSError("disk full")))
    with pytest.raises(OSError):
        write_shards(prepared, out, maxcount=20, progress=False)
    monkeypatch.undo()
    verify_shards(out, before)
    assert load_manifest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_blocks_smaller_than_a_shard_round_trip(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "BLOCK_BYTES", 16 * 64)  # 16 digits of 8x8 per block: 16, 16, 16, 2 per shard
    manifest = write_shards(prepared, tmp_path / "shards", maxcount=50, progress=False)
    urls = shard_urls(tmp_path / "shards", manifest, "train")
    images, labels, keys = read_back(urls)
    expected = load_split(prepared, "train")
    np.testing.assert_array_equal(images, expected.images)
    np.testing.assert_array_equal(labels, expected.labels)
    assert keys[:5] == ["train-0000000", "train-0000016", "train-0000032", "train-0000048", "train-0000050"]
    keyed = list(iter_keyed(urls))  # the loader's view: every image under its own key, in order
    assert [k for k, _, _ in keyed] == [f"train-{i:07d}" for i in range(len(expected.labels))]
    assert [y for _, _, y in keyed] == expected.labels.tolist()


def test_a_corrupt_block_names_its_shard_and_block(tmp_path):
    path = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "train-0000000", "images.npy": b"\x93NUMPY garbage", "labels.npy": b""})
    with pytest.raises(ShardError, match=r"train-000000\.tar: block train-0000000 is unreadable"):
        list(iter_keyed([str(path)]))
    with wds.TarWriter(str(path)) as writer:  # readable arrays that disagree: 3 images, 2 labels
        images, labels = np.zeros((3, 8, 8, 1), np.uint8), np.zeros(2, np.int64)
        writer.write(
            {"__key__": "train-0000000", "images.npy": encode_array(images), "labels.npy": encode_array(labels)}
        )
    with pytest.raises(ShardError, match=r"block train-0000000 is unreadable .*labels \(2,\)"):
        list(iter_keyed([str(path)]))


# ---------------------------------------------------------------- shard jobs, in any order, as Ray tasks


def test_shards_are_the_same_bytes_whatever_order_the_jobs_run_in(prepared_rgb, tmp_path):
    """Each shard is a job that reads its own images from the source: run backwards, the bytes are the same."""

    def backwards(task, jobs):
        done = {job.name: task(job) for job in reversed(jobs)}
        return [done[job.name] for job in jobs]

    forwards = write_shards(prepared_rgb, tmp_path / "a", maxcount=5, progress=False)
    reverse = write_shards(prepared_rgb, tmp_path / "b", maxcount=5, progress=False, mapper=backwards)
    assert forwards == reverse and len(forwards["splits"]["train"]["shards"]) > 2
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_a_source_image_gone_since_prepare_stops_the_shard_stage_naming_it(tmp_path):
    root = tmp_path / "src"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (5, 5), 10 * i).save(root / c / f"{i}.png")
    prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "prepared")
    (root / "b" / "7.png").write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=r"b/7\.png: cannot read image .*changed since the prepare stage"):
        write_shards(tmp_path / "prepared", tmp_path / "shards", maxcount=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "src"]  # no shards, no temporary folder


@pytest.mark.ray
def test_shard_tasks_on_ray_write_the_same_shards_and_fail_naming_the_file(ray_cluster, prepared_rgb, tmp_path):
    from latentzoo.stages.tasks import ray_tasks

    here = write_shards(prepared_rgb, tmp_path / "here", maxcount=5, progress=False)
    on_ray = write_shards(prepared_rgb, tmp_path / "ray", maxcount=5, progress=False, mapper=ray_tasks)
    assert on_ray == here
    for shard in here["splits"]["train"]["shards"]:
        assert (tmp_path / "ray" / shard["name"]).read_bytes() == (tmp_path / "here" / shard["name"]).read_bytes()

    moved = tmp_path / "prepared_moved"  # its source folder gone: the first task fails, the stage names the file
    info = json.loads((prepared_rgb / "prepare.json").read_text())
    moved.mkdir()
    (moved / "index.npz").write_bytes((prepared_rgb / "index.npz").read_bytes())
    info["data"]["path"] = str(tmp_path / "nowhere")
    (moved / "prepare.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"nowhere/[ab]/\d+\.png: cannot read image"):
        write_shards(moved, tmp_path / "failed", maxcount=5, progress=False, mapper=ray_tasks)
    assert not (tmp_path / "failed").exists()


@pytest.mark.ray
def test_a_shard_task_that_fails_on_an_os_error_runs_again(ray_cluster, prepared, tmp_path):
    from latentzoo.data.prepare import load_prepared
    from latentzoo.data.shards import shard_jobs
    from latentzoo.stages.tasks import ray_tasks

    marker = tmp_path / "failed-once"

    def flaky(job):
        if not marker.exists():
            marker.touch()
            raise OSError("a transient read error")
        return {"name": job.name}

    jobs = shard_jobs(load_prepared(prepared), maxcount=100)
    assert [entry["name"] for entry in ray_tasks(flaky, jobs)] == [job.name for job in jobs]
    assert marker.exists()


@pytest.mark.ray
def test_a_consumer_that_stops_reading_cancels_only_the_unfinished_tasks(ray_cluster, tmp_path):
    import time

    import ray

    from latentzoo.stages.tasks import ray_tasks

    def job(seconds):
        (tmp_path / f"started-{seconds}").touch()
        deadline = time.monotonic() + seconds
        try:  # short sleeps, as a data task's work is short steps: one long sleep ignores ray.cancel (ray#32954)
            while time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:  # how ray.cancel stops a running task
            (tmp_path / f"cancelled-{seconds}").touch()
            raise
        (tmp_path / f"finished-{seconds}").touch()
        return seconds

    def wait_for(path):  # under load a task's worker can take seconds to start
        deadline = time.monotonic() + 120
        while not path.exists():
            assert time.monotonic() < deadline, f"no {path.name}"
            time.sleep(0.05)

    results = ray_tasks(job, [0, 60])
    assert next(results) == 0
    wait_for(tmp_path / "started-60")  # running, not only queued
    results.close()  # as zip does with a generator it no longer needs: the running task is cancelled
    wait_for(tmp_path / "cancelled-60")
    assert (tmp_path / "finished-0").exists() and not (tmp_path / "finished-60").exists()
    assert list(ray_tasks(job, [0, 0])) == [0, 0]  # read to the end: nothing to cancel, and Ray is still up
    assert ray.is_initialized()


@pytest.mark.ray
def test_an_image_folder_checked_by_ray_tasks_prepares_the_same_index(ray_cluster, tmp_path, monkeypatch):
    """prepare's scan checks an image folder in chunks, as Ray tasks on a cluster: the same index and prepare.json
    as one process, the same unreadable file skipped, or named when on_error is raise."""
    import latentzoo.data.sources as sources
    from latentzoo.stages.tasks import ray_tasks

    monkeypatch.setattr(sources, "CHECK_CHUNK", 7)  # the driver cuts the chunks: several per task count
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    (root / "b" / "09.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    skip = DataConfig(source="imagefolder", path=str(root), on_error="skip")
    here = prepare(skip, seed=0, out_dir=tmp_path / "here")
    on_ray = prepare(skip, seed=0, out_dir=tmp_path / "ray", mapper=ray_tasks)
    assert on_ray == here and here["skipped"]["count"] == 1
    assert (tmp_path / "ray/index.npz").read_bytes() == (tmp_path / "here/index.npz").read_bytes()
    with pytest.raises(DataError, match=r"b/09\.png: cannot read image"):
        prepare(skip.model_copy(update={"on_error": "raise"}), seed=0, out_dir=tmp_path / "raise", mapper=ray_tasks)
