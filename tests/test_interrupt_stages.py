"""SIGTERM (a scheduler's stop, `kill`) and SIGINT (Ctrl-C) to the train and evaluate stage scripts, mid-work:
exit 143 / 130, nothing under the final output names, and the same command (what the next `dvc repro` runs)
completes the work, training from its last checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, make_params
from test_bad_input import interactive_signals

pytestmark = pytest.mark.ray

EPOCHS = 8  # far more than the 2 checkpoints before the stop: workers may train on while the driver exits


def stage(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipelines" / script), "--params", "params.yaml", *args]


TRAIN = stage(
    "train.py",
    "--model",
    "vae",
    "--shards",
    "shards",
    "--out",
    "models/vae",
    "--metrics",
    "metrics/vae.json",
    "--plots",
    "plots/vae.csv",
)
EVALUATE = stage(
    "evaluate.py",
    "--model-dir",
    "models/vae",
    "--shards",
    "shards",
    "--metrics",
    "metrics/evaluate/vae.json",
    "--plots",
    "plots/evaluate/vae",
)


@pytest.fixture
def workspace(ray_cluster, digits_shards, tmp_path, mlflow_uri):
    """A stage's working directory on the session's Ray, with the tiny params and the digits shards."""
    import ray

    params = make_params(**{**TINY, "train.num_workers": 1, "train.epochs": EPOCHS, "tracking.log_models": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    (tmp_path / "shards").symlink_to(digits_shards)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "LATENTZOO_DEBUG": "",
    }
    return tmp_path, env


def interrupt_when(cmd, cwd: Path, env: dict, ready, sig: int, timeout_s: float = 180) -> tuple[int, str]:
    """Start `cmd`, send `sig` once `ready()` holds; its exit status and output."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=interactive_signals,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "never got ready to interrupt"
            time.sleep(0.05)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, output


def stopped_cleanly(output: str, message: str) -> bool:
    """The stage said `message` on a line of its own and printed no traceback. (Not necessarily last: Ray relays
    the workers' output to the driver asynchronously, so their lines, and Ray's own, may arrive after it.)"""
    return any(line.endswith(message) for line in output.splitlines()) and "Traceback" not in output


def newest_epoch(cwd: Path) -> int:
    """The epoch (1, 2, ...) of the newest readable checkpoint Ray Train wrote under `cwd`, 0 if none."""
    from latentzoo.checkpoint import CHECKPOINT_FILE, load_state

    epochs = [0]
    for path in (cwd / ".ray_results").glob(f"*/checkpoint_*/{CHECKPOINT_FILE}"):
        try:
            epochs.append(load_state(path)["epoch"] + 1)
        except Exception:  # being written, or deleted (checkpoints_to_keep) while we read
            continue
    return max(epochs)


def run(cmd, cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def test_train_and_evaluate_stopped_midway_finish_on_the_next_run(workspace):
    from mlflow.tracking import MlflowClient

    cwd, env = workspace
    code, output = interrupt_when(TRAIN, cwd, env, lambda: newest_epoch(cwd) >= 2, signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert stopped_cleanly(output, "terminated: nothing was written under the final output names")
    assert not (cwd / "models").exists() and not (cwd / "metrics").exists() and not (cwd / "plots").exists()
    stopped_at = newest_epoch(cwd)
    time.sleep(3)
    assert newest_epoch(cwd) == stopped_at  # the run was aborted before the stage exited: no worker trains on

    output = run(TRAIN, cwd, env)  # what `dvc repro` runs next: the stage's outputs are missing
    resumed = int(re.search(r"resuming from the checkpoint of epoch (\d+)", output).group(1))
    assert 1 <= resumed <= stopped_at  # Ray's last registered checkpoint; the newest folder may be unregistered
    rows = (cwd / "plots/vae.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, EPOCHS + 1))  # none lost, none repeated
    run_id = json.loads((cwd / "models/vae/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the stage's store
    assert client.get_run(run_id).info.status == "FINISHED"  # the interrupted attempt's run, resumed
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, EPOCHS + 1))

    plots = cwd / "plots/evaluate"
    started = lambda: plots.exists() and any(plots.iterdir())  # noqa: E731  (its temporary figures folder)
    code, output = interrupt_when(EVALUATE, cwd, env, started, signal.SIGINT)
    assert code == 130, output[-3000:]
    assert not (cwd / "metrics/evaluate").exists() and [p.name for p in plots.iterdir()] == []

    run(EVALUATE, cwd, env)
    assert json.loads((cwd / "metrics/evaluate/vae.json").read_text())["test_mse"] > 0
    assert (plots / "vae" / "samples.png").exists()
