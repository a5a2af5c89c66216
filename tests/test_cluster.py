"""Multi-node on one machine: a Ray head and a worker node as separate `ray start` processes with one CPU each,
the train stage's DDP across both (STRICT_SPREAD) logging to an `mlflow server` over HTTP, and one training
worker process killed mid-run: the run resumes from its last checkpoint and ends complete, no epoch logged twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, make_params

from latentzoo.local_cluster import Head, local_head, stop

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


@contextmanager
def worker_node(head: Head, num_cpus: int = 1):
    """`ray start --address` joining `head` as a second node, with its token (own process group, stopped on exit)."""
    temp_dir = tempfile.mkdtemp(prefix="lz-ray-worker-", dir="/tmp")
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        f"--address={head.address}",
        "--block",
        f"--num-cpus={num_cpus}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    node = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **head.auth}
    )
    try:
        yield node
    finally:
        stop(node)


def kill_one_training_worker(run_dir: Path, after_checkpoints: int, timeout_s: float = 240) -> int:
    """Once `after_checkpoints` checkpoints are in `run_dir`, SIGKILL one Ray Train worker process; its pid."""
    deadline = time.monotonic() + timeout_s
    while len(list(run_dir.glob("*/checkpoint_*"))) < after_checkpoints:
        assert time.monotonic() < deadline, f"no checkpoints under {run_dir} after {timeout_s} s"
        time.sleep(0.1)
    pids = [pid for pid in ray_train_workers() if started_here(pid)]
    assert pids, "no Ray Train worker process of this session found"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def ray_train_workers() -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True).stdout.split()]


def started_here(pid: int) -> bool:
    """Whether process `pid` belongs to this test session's Ray: its environment holds the session's RAY_TMPDIR
    (tests/conftest.py gives each session, and each pytest-xdist worker, one of its own)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone already
        return False
    return f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}".encode() in environ


def test_ddp_across_two_nodes_resumes_after_a_worker_is_killed(digits_shards, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    epochs = 12
    params = make_params(
        **{
            **TINY,
            "train.num_workers": 2,
            "train.placement_strategy": "STRICT_SPREAD",
            "train.epochs": epochs,
            "train.max_failures": 2,
            "tracking.log_models": False,
            "ray.storage_path": str(tmp_path / "ray"),
        }
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    cmd = [
        sys.executable,
        str(ROOT / "pipelines/train.py"),
        "--params",
        "params.yaml",
        "--model",
        "vae",
        "--shards",
        str(digits_shards),
        "--out",
        "models/vae",
        "--metrics",
        "train.json",
        "--plots",
        "train.csv",
    ]
    with local_head(num_cpus=1) as head, worker_node(head):
        env = head.client_env(MLFLOW_TRACKING_URI=mlflow_server)
        train = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            kill_one_training_worker(tmp_path / "ray", after_checkpoints=2)
            output, _ = train.communicate(timeout=600)
        finally:
            train.kill()
    assert train.returncode == 0, output[-3000:]
    assert "[vae] 2 worker(s) on 2 node(s)" in output  # STRICT_SPREAD: one worker on each node
    assert "resuming from the checkpoint of epoch" in output
    rows = (tmp_path / "train.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, epochs + 1))  # none lost, none repeated

    import json

    run = json.loads((tmp_path / "models/vae/mlflow_run.json").read_text())
    assert run["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    assert client.get_run(run["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run["run_id"], "val_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # every epoch logged exactly once
