"""Shared fixtures: one Ray instance per test session, tiny digits shards, an isolated MLflow store."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from latentzoo.data.cache import CACHE_DIR_ENV
from latentzoo.local_cluster import auth_env

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to a user's cluster or tracking server.
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def fresh_machine() -> None:
    """Run the session as on a fresh machine: an empty home (no ~/.ray token, no DVC, MLflow or git user config),
    DVC's system config and site cache inside it, Ray's temp files in a folder of its own (not /tmp/ray), and one
    random Ray token for the session's Ray and every stage it starts, handed over in the environment. The node
    caches of decoded shards (`latentzoo.data.cache`) go to a folder of the session's own, removed at exit: runs
    clear their own, tests that run the loop directly leave theirs, and parallel sessions (pytest -n) would
    otherwise share, and remove, one another's (the digits shards' manifests are the same)."""
    home = tempfile.mkdtemp(prefix="lz-home-")
    ray_tmp = tempfile.mkdtemp(prefix="lz-tmp-", dir="/tmp")  # short: Ray's socket paths live under it
    caches = tempfile.mkdtemp(prefix="lz-cache-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    for folder in (home, ray_tmp, caches):
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    os.environ.update({"HOME": home, "RAY_TMPDIR": ray_tmp, CACHE_DIR_ENV: caches, **auth_env()})
    for name in ("DVC_SYSTEM_CONFIG_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):  # not /etc/xdg, /var/tmp
        os.environ[name] = os.path.join(home, name.lower())


fresh_machine()


def make_params(**overrides):
    """Validated Params from the repo's params.yaml with dotted overrides, e.g. {"train.epochs": 2}."""
    from latentzoo.config import validate_params

    return validate_params(with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides))


def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """A gloo process group met through a file: no port to race for (a free port can be taken before it is bound)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def with_overrides(raw: dict, overrides: dict) -> dict:
    """`raw` (params.yaml as loaded) with dotted keys set in place, e.g. {"train.epochs": 2}; returns `raw`."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


TINY = {
    "vae.latent_dim": 4,
    "vae.hidden_channels": 8,
    "vae.fc_hidden": 32,
    "vqvae.hidden_channels": 8,
    "vqvae.codebook_dim": 8,
    "vqvae.codebook_size": 64,
    "simvq.hidden_channels": 8,
    "simvq.codebook_dim": 8,
    "simvq.codebook_size": 64,
    "train.batch_size": 32,
    "train.epochs": 2,
    "train.lr": 0.003,
    "evaluate.nll_samples": 20,  # k = 200 (params.yaml) costs seconds per evaluation of even a tiny VAE
}


@pytest.fixture
def tiny_params():
    return lambda **kw: make_params(**{**TINY, **kw})


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled digits, prepared and sharded (500 per shard → uneven train shards: 500, 500, 257)."""
    from latentzoo.data.prepare import prepare
    from latentzoo.data.shards import write_shards

    params = make_params()
    base = tmp_path_factory.mktemp("digits")
    prepare(params.data, params.seed, base / "prepared")
    write_shards(base / "prepared", base / "shards", maxcount=500, progress=False)
    return base / "shards"


@pytest.fixture
def node_cache(digits_shards, tmp_path, monkeypatch):
    """The node cache of the digits' train and val shards, in this test's folder (not /dev/shm); this process's
    maps dropped after."""
    from latentzoo.data import cache
    from latentzoo.data.shards import load_manifest, shard_urls
    from latentzoo.training.job import node_cache

    monkeypatch.setattr(cache, "bases", lambda: [tmp_path / "node"])
    manifest = load_manifest(digits_shards)
    urls = {split: shard_urls(digits_shards, manifest, split) for split in ("train", "val")}
    node = node_cache(manifest, "0" * 64, urls, cache_mb=2**20)
    yield node
    node.clear()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the whole session: Ray takes tens of seconds to start.

    Its processes call MLflow without retries: the tests that stop an MLflow server mid-run set that for their own
    process, which a stage would forward when it starts Ray (`forwarded_env`), but this Ray started before them.
    (With MLflow's default 7 retries, each call to the stopped server held a Ray process for about 4 minutes.)"""
    import ray

    from latentzoo.training.cluster import connect_ray

    with pytest.MonkeyPatch.context() as env:  # for Ray's processes only, not this one
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        connect_ray(num_cpus=2)  # as the stages start it (Ray Train's poll interval and start timeout set)
    yield
    ray.shutdown()


def start_mlflow_server(folder: Path, port: int):
    """An `mlflow server` on 127.0.0.1:`port` (sqlite backend and proxied artifacts in `folder`), once it answers.
    Started again on the same folder and port, it serves the same runs."""
    import subprocess
    import sys

    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "server-artifacts"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server)
    except BaseException:
        stop_mlflow_server(server)
        raise
    return server


def stop_mlflow_server(server) -> None:
    """SIGTERM the server's process group; SIGKILL it if it is still up after 30 s (a loaded machine was seen to
    take longer to stop the server's workers)."""
    import signal
    import subprocess

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """An `mlflow server` on loopback (sqlite backend, artifacts proxied to a local folder); yields its URI."""
    from latentzoo.local_cluster import free_port

    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    finally:
        stop_mlflow_server(server)


def wait_until_up(url: str, process, timeout_s: float = 120.0, log: Path | None = None) -> None:
    """Poll `url` until it answers; fail with the process's stderr (or its `log` file) if it exits first, or after
    `timeout_s`."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None, (log.read_text() if log else process.stderr.read().decode())[-2000:]
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s:.0f} s"
            time.sleep(1)


# The slowest files, slowest first (CI's --durations; the test marked `alone` runs apart): `make test` runs the suite
# in two processes, each taking a whole file at a time (pytest-xdist, --dist loadfile), and starting the long ones
# first keeps one process from being left with a long file at the end while the other idles.
SLOWEST_FIRST = (
    "test_pipeline.py",
    "test_interrupt_dag.py",
    "test_layerwise.py",
    "test_interrupt_stages.py",
    "test_tune.py",
    "test_mlflow_outage.py",
    "test_training.py",
    "test_cluster.py",
    "test_submit.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: files keep their order
