"""Shards in object storage (`shard.uri: s3://…`), against a local S3-compatible server (moto) on loopback: the shard
stage uploads there, the manifest names the location, training streams from there, and bad locations stop the
stage with one line naming the URI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY, make_params, wait_until_up

from latentzoo.data.loader import iter_blocks
from latentzoo.data.prepare import load_split, prepare
from latentzoo.data.shards import load_manifest, shard_urls, verify_shards
from latentzoo.errors import ShardError
from latentzoo.stages.shard import shard_stage

BUCKET = "lz-shards"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """`moto_server` on a free loopback port with one bucket; the AWS_* environment pointing at it."""
    from pyarrow import fs

    from latentzoo.local_cluster import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"  # a file: it logs every request, which would fill a pipe
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        wait_until_up(f"{endpoint}/moto-api/", server, timeout_s=60, log=log)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            s3 = fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
            s3.create_dir(BUCKET)
            yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    params = make_params(**{"data.limit": 300})
    out = tmp_path_factory.mktemp("s3") / "prepared"
    prepare(params.data, params.seed, out)
    return out


def read_all(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    blocks = list(iter_blocks(urls))
    return np.concatenate([b.images for b in blocks]), np.concatenate([b.labels for b in blocks])


def test_shards_go_to_object_storage_and_training_streams_them_from_there(s3_endpoint, prepared, tmp_path):
    from latentzoo.training.trainer import TrainOutputs, train_model

    uri = f"s3://{BUCKET}/run-a"
    params = make_params(**TINY, **{"shard.maxcount": 64, "shard.uri": uri + "/"})
    manifest = shard_stage(params, prepared, tmp_path / "shards")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["manifest.json"]  # the tars are in the bucket
    assert load_manifest(tmp_path / "shards")["location"] == uri == manifest["location"]
    urls = shard_urls(tmp_path / "shards", manifest, "train")
    assert urls == [f"{uri}/train-{k:06d}.tar" for k in range(4)]  # 210 train images, 64 per shard
    verify_shards(tmp_path / "shards")
    for split in ("train", "val", "test"):
        images, labels = read_all(shard_urls(tmp_path / "shards", manifest, split))
        expected = load_split(prepared, split)
        np.testing.assert_array_equal(images, expected.images)
        np.testing.assert_array_equal(labels, expected.labels)

    local = make_params(**TINY, **{"shard.maxcount": 64})  # the same shards on disk: the same bytes
    shard_stage(local, prepared, tmp_path / "local")
    assert load_manifest(tmp_path / "local")["splits"] == manifest["splits"]

    params = params.updated(**{"train.num_workers": 0, "train.epochs": 1, "tracking.enabled": False})
    out = TrainOutputs(tmp_path / "model", tmp_path / "train.json", tmp_path / "train.csv")
    final = train_model(params, "vae", tmp_path / "shards", out, root=tmp_path)
    assert final["epochs"] == 1 and np.isfinite(final["val_loss"])


def test_a_changed_shard_in_the_bucket_is_refused_naming_its_uri(s3_endpoint, prepared, tmp_path):
    from pyarrow import fs

    uri = f"s3://{BUCKET}/run-b"
    shard_stage(make_params(**{"shard.maxcount": 100, "shard.uri": uri}), prepared, tmp_path / "shards")
    s3 = fs.S3FileSystem(endpoint_override=s3_endpoint["AWS_ENDPOINT_URL"], region="us-east-1")
    with s3.open_output_stream(f"{BUCKET}/run-b/val-000000.tar") as f:
        f.write(b"not the shard the manifest describes")
    with pytest.raises(ShardError, match=rf"^{uri}/val-000000\.tar: sha256 mismatch"):
        verify_shards(tmp_path / "shards")
    s3.delete_file(f"{BUCKET}/run-b/val-000000.tar")
    with pytest.raises(ShardError, match=rf"^{uri}/val-000000\.tar: not found"):
        verify_shards(tmp_path / "shards")


def run_shard_stage(tmp_path: Path, prepared: Path, uri: str, env: dict) -> subprocess.CompletedProcess:
    params = make_params(**{"shard.uri": uri})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    cmd = [sys.executable, str(ROOT / "pipelines/shard.py"), "--prepared", str(prepared), "--out", "shards"]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "case, uri, endpoint",
    [
        ("missing bucket", "s3://no-such-bucket/shards", None),
        ("unreachable endpoint", f"s3://{BUCKET}/shards", "http://127.0.0.1:9"),
    ],
)
def test_a_bad_location_stops_the_stage_with_one_line_naming_the_uri(
    s3_endpoint, prepared, tmp_path, case, uri, endpoint
):
    env = {**s3_endpoint, **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})}
    done = run_shard_stage(tmp_path, prepared, uri, env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {uri}: cannot be reached"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "shards").exists()


def test_shard_uri_must_be_a_uri():
    from latentzoo.config import ConfigError

    with pytest.raises(ConfigError, match="shard.uri must be a URI such as s3://bucket/prefix"):
        make_params(**{"shard.uri": "data/shards-elsewhere"})
    assert json.loads(json.dumps(make_params(**{"shard.uri": "s3://b/p"}).shard.model_dump()))["uri"] == "s3://b/p"


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def local_sources(tmp_path_factory) -> Path:
    """An IDX gz pair (train and t10k) and an image folder with grey, RGB and one broken file."""
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("sources"), np.random.default_rng(0)
    (root / "idx").mkdir()
    for prefix, n in (("train", 600), ("t10k", 100)):
        write_idx(root / f"idx/{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 9, 7), np.uint8), 0x803)
        write_idx(root / f"idx/{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 3, n, np.uint8), 0x801)
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(20):
            shape = (10, 12, 3) if (i + c) % 3 == 0 else (10, 12)
            Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(root / "folder" / name / f"{i:03d}.png")
    (root / "folder/bee/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


def upload_folder(folder: Path, uri: str) -> None:
    from latentzoo.data.remote import upload

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        upload(path, f"{uri}/{path.relative_to(folder).as_posix()}")


@pytest.mark.parametrize(
    "data",
    [
        {"data.source": "idx", "data.keep_source_test": True},
        {"data.source": "imagefolder", "data.image_size": 8, "data.on_error": "skip"},
    ],
    ids=["idx", "imagefolder"],
)
def test_a_source_in_object_storage_gives_the_shards_its_local_copy_gives(s3_endpoint, local_sources, tmp_path, data):
    kind = "idx" if data["data.source"] == "idx" else "folder"
    uri = f"s3://{BUCKET}/sources-{kind}"
    upload_folder(local_sources / kind, uri)
    runs = {}
    for where, path in (("local", str(local_sources / kind)), ("bucket", uri)):
        params = make_params(**data, **{"data.path": path, "shard.maxcount": 100})
        info = prepare(params.data, params.seed, tmp_path / where / "prepared")
        manifest = shard_stage(params, tmp_path / where / "prepared", tmp_path / where / "shards")
        runs[where] = info, manifest
    assert runs["bucket"][1]["splits"] == runs["local"][1]["splits"]  # every shard's sha256: the same bytes
    assert runs["bucket"][0]["source_sha256"] == runs["local"][0]["source_sha256"]
    if kind == "folder":
        (skipped,) = runs["bucket"][0]["skipped"]["files"]
        assert skipped["file"] == f"{uri}/bee/broken.png" and f"'{uri}/bee/broken.png'" in skipped["reason"]


def test_a_missing_source_in_object_storage_is_named(s3_endpoint, tmp_path):
    from latentzoo.errors import DataError

    params = make_params(**{"data.source": "idx", "data.path": f"s3://{BUCKET}/no-such-source"})
    with pytest.raises(DataError, match=rf"^s3://{BUCKET}/no-such-source: data.path is not a directory"):
        prepare(params.data, params.seed, tmp_path / "prepared")
