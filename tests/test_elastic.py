"""Elastic training (`train.num_workers: [min, max]`): the worker group grows and shrinks with the cluster while
the optimisation stays the same, because the global batch is fixed and each rank's loss is scaled by its share."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, make_params
from test_cluster import worker_node

from latentzoo.checkpoint import CHECKPOINT_FILE, load_state
from latentzoo.config import ConfigError
from latentzoo.local_cluster import local_head
from latentzoo.training.job import training_data
from latentzoo.training.loop import Session, rank_batch, run_loop

# The elastic run's final val −ELBO against a fixed-size run of the same global batch: the shards each rank reads
# differ between sizes (so does the order of the images), the optimisation does not.
TOLERANCE = 0.05
DRAIN_DEADLINE_S = 10  # a reclaimed node's drain: Ray Train restarts the group without it at this deadline


def test_a_worker_range_is_validated_and_fixes_the_global_batch():
    train = make_params(**{"train.num_workers": [1, 4], "train.batch_size": 16}).train
    assert train.elastic and (train.min_workers, train.max_workers) == (1, 4)
    assert train.global_batch == 64  # batch_size at the largest size, whatever size the group has now
    fixed = make_params(**{"train.num_workers": 2, "train.batch_size": 16}).train
    assert not fixed.elastic and fixed.global_batch == 32 and fixed.min_workers == fixed.max_workers == 2
    assert make_params(**{"train.num_workers": [1, 2], "train.global_batch_size": 50}).train.global_batch == 50
    for bad in ([2, 1], [0, 2], [1, 2, 3], [3]):
        with pytest.raises(ConfigError, match=r"train\.num_workers must be a number or \[min, max\]"):
            make_params(**{"train.num_workers": bad})
    with pytest.raises(ConfigError, match="gives some of the 4 workers no images"):
        make_params(**{"train.num_workers": [1, 4], "train.global_batch_size": 3})


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_the_ranks_share_the_global_batch(world):
    shares = [rank_batch(64, rank, world) for rank in range(world)]
    assert sum(shares) == 64 and max(shares) - min(shares) <= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_scaled_rank_losses_give_the_gradient_of_the_global_batch(world):
    """DDP averages the ranks' gradients: with each rank's mean loss scaled by n_r·world/B, that average is the
    gradient of the mean loss over the whole global batch, whatever the split."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(10, 5), torch.randn(10, 1)

    def grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = grad(torch.nn.functional.mse_loss(model(x), y))
    shares = [rank_batch(10, rank, world) for rank in range(world)]
    starts = [sum(shares[:r]) for r in range(world)]
    averaged = (
        sum(
            grad(torch.nn.functional.mse_loss(model(x[s : s + n]), y[s : s + n]) * n * world / 10)
            for s, n in zip(starts, shares, strict=True)
        )
        / world
    )
    torch.testing.assert_close(averaged, whole)


def scripted_session(run_dir: Path, notice_at: int | None = None, resume: Path | None = None):
    """A one-process Ray Train session whose `get_preemption_info` answers None until its `notice_at`-th question
    (then a notice for a node holding rank 1); the reports, each (metrics, checkpoint folder), in a list."""
    import ray.train
    from ray.train.v2.api.preemption import PreemptionInfo

    reports: list[tuple[dict, Path]] = []

    def report(metrics, checkpoint=None):
        folder = run_dir / f"checkpoint_{len(reports):06d}"
        shutil.copytree(checkpoint.path, folder)
        reports.append((metrics, folder))

    asked = itertools.count(1)
    notice = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"node-b": [1]})
    resume_from = ray.train.Checkpoint.from_directory(resume) if resume else None
    session = Session(
        *(0, 1, 1, lambda: resume_from, report, ray.train.Checkpoint, lambda m: m, torch.device("cpu"), None),
        lambda: notice if notice_at and next(asked) >= notice_at else None,
    )
    return session, reports


def test_a_preemption_notice_checkpoints_mid_epoch_and_the_restart_resumes_at_that_step(
    digits_shards, tmp_path, capsys
):
    """Asked every 3 steps, Ray's second answer is a notice: the loop saves a checkpoint after step 6 of epoch 1 and
    trains on (one checkpoint per notice); the group Ray restarts from it takes the remaining steps of epoch 1 and
    ends with one history of every epoch once."""
    params = make_params(**TINY, **{"train.num_workers": 1, "train.preemption_check_steps": 3})
    job = training_data(params, "vae", digits_shards).job(params, "vae")
    steps = job.num_train // params.train.global_batch + bool(job.num_train % params.train.global_batch)

    session, reports = scripted_session(tmp_path / "first", notice_at=2)
    (tmp_path / "first").mkdir()
    run_loop(job, session)
    marks = [{k: m[k] for k in ("epoch", "steps_done") if k in m} for m, _ in reports]
    assert marks == [{"epoch": 1, "steps_done": 6}, {"epoch": 1}, {"epoch": 2}]  # one notice, one extra checkpoint
    out = capsys.readouterr().out
    assert "node(s) node-b reclaimed (ranks [1]): checkpointing mid-epoch" in out
    assert "[vae] checkpointed at step 6 of epoch 1" in out
    mid = load_state(reports[0][1] / CHECKPOINT_FILE)
    assert (mid["epoch"], mid["step"], mid["steps_done"], mid["history"]) == (-1, 6, 6, [])

    session, resumed = scripted_session(tmp_path / "second", resume=reports[0][1])
    (tmp_path / "second").mkdir()
    run_loop(job, session)
    assert "[vae] resuming from step 6 of epoch 1" in capsys.readouterr().out
    final = load_state(resumed[-1][1] / CHECKPOINT_FILE)
    assert [row["epoch"] for row in final["history"]] == [1, 2] and final["step"] == 2 * steps
    assert final["history"][0]["steps_max"] == steps - 6  # the rest of epoch 1, then a whole epoch 2
    assert final["history"][1]["steps_max"] == steps
    assert final["history"][1]["train_loss"] < final["history"][0]["train_loss"]


def final_val_loss(params, shards: Path) -> float:
    """The last epoch's val −ELBO of the VAE trained on `shards` by the loop in this process, as one worker."""
    import ray.train

    job = training_data(params, "vae", shards).job(params, "vae")
    rows: list[dict] = []

    def report(row: dict, checkpoint=None) -> None:  # the checkpoints: not needed
        rows.append(row)

    run_loop(job, Session(0, 1, 1, lambda: None, report, ray.train.Checkpoint, lambda m: m, torch.device("cpu")))
    assert [row["epoch"] for row in rows] == list(range(1, params.train.epochs + 1))
    return rows[-1]["val_neg_elbo"]


def train_command(tmp_path, shards, out: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "pipelines/train.py"),
        *("--params", "params.yaml", "--model", "vae", "--shards", str(shards)),
        *("--out", f"models/{out}", "--metrics", f"{out}.json", "--plots", f"{out}.csv"),
    ]


def wait_for(lines: list[str], text: str, proc, timeout_s: float = 240, after: int = 0) -> int:
    """Index of the first line from `after` on that contains `text`; fails if `proc` ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        for i in range(after, len(lines)):
            if text in lines[i]:
                return i
        assert proc.poll() is None or any(text in line for line in lines[after:]), "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n" + "".join(lines)[-8000:]
        time.sleep(0.1)


def read_into(stream, lines: list[str]) -> None:
    """Every line of `stream` into `lines`, echoed (pytest shows it when the test fails)."""
    for line in iter(stream.readline, ""):
        lines.append(line)
        print(line, end="", flush=True)


def rows_of(csv: Path) -> list[dict]:
    import csv as csv_module

    return list(csv_module.DictReader(csv.read_text().splitlines()))


def resume_point(line: str) -> tuple[int, int]:
    """(whole epochs, steps of the next) a `resuming from …` line names: `step S of epoch E` or `the checkpoint of
    epoch N`."""
    numbers = [int(word) for word in line.split() if word.isdigit()]
    return (numbers[1] - 1, numbers[0]) if " step " in line else (numbers[0], 0)


def drain(head, deadline_s: int) -> None:
    """`ray drain-node` (a preemption, with a deadline) for the head's other node, as KubeRay's preStop hook does."""
    workers = "[n['NodeID'] for n in ray.nodes() if n['Alive'] and 'node:__internal_head__' not in n['Resources']]"
    listed = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(); print(*{workers})"],
        env=head.client_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    (node,) = listed.stdout.strip().splitlines()[-1].split()  # the one node that is not the head
    reason = ("--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "test")
    subprocess.run(
        [
            Path(sys.executable).with_name("ray"),
            "drain-node",
            "--node-id",
            node,
            *reason,
            "--deadline-remaining-seconds",
            str(deadline_s),
        ],
        env=head.client_env(),
        check=True,
        capture_output=True,
    )


@pytest.mark.ray
@pytest.mark.cluster
@pytest.mark.alone  # beside other tests on 2 cores its restart once waited past 240 s (CI at 0efaba9)
def test_a_run_grows_when_a_node_joins_and_shrinks_when_it_is_reclaimed(digits_shards, tmp_path, mlflow_uri):
    """Head with 1 CPU, `num_workers: [1, 2]`: the run starts on 1 worker, grows to 2 when a second node joins and,
    when that node is reclaimed (drained with a deadline, as KubeRay's preStop hook does, then stopped), checkpoints
    mid-epoch and shrinks back to 1 worker from that checkpoint (or a later epoch's). It ends with one continuous
    history (every epoch once, in the plots CSV and in MLflow, the worker count per epoch) and metrics close to a
    fixed 1-worker run of the same global batch (the same loop, run in this process: Ray adds nothing to it)."""
    from mlflow.tracking import MlflowClient

    # ~0.15 s each on a quiet machine; the node joins (10-30 s under the suite's load), is drained and stays the 10 s
    # of its deadline, then the group restarts without it: all that mid-run (at 120 epochs, once, the run ended first)
    epochs = 240
    common = {
        **TINY,
        "train.epochs": epochs,
        "train.max_failures": 4,
        "train.elastic_resize_interval_s": 1.0,
        "train.global_batch_size": 64,
        "train.preemption_check_steps": 2,
        "ray.worker_start_timeout_s": 10.0,
        "tracking.log_models": False,
        "ray.storage_path": str(tmp_path / "ray"),
    }
    fixed_loss = final_val_loss(make_params(**common, **{"train.num_workers": 1}), digits_shards)
    with local_head(num_cpus=1) as head:
        env = head.client_env(MLFLOW_TRACKING_URI=mlflow_uri, RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5")
        elastic = make_params(**common, **{"train.num_workers": [1, 2]})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(elastic.model_dump(), sort_keys=False))
        lines: list[str] = []
        train = subprocess.Popen(
            train_command(tmp_path, digits_shards, "elastic"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = threading.Thread(target=read_into, args=(train.stdout, lines), daemon=True)
        reader.start()
        try:
            first = wait_for(lines, "[vae] 1 worker(s) on 1 node(s)", train)
            with worker_node(head):
                grown = wait_for(lines, "[vae] 2 worker(s) on 2 node(s)", train)
                wait_for(lines, "[vae] epoch ", train, after=grown)
                deadline = time.monotonic() + DRAIN_DEADLINE_S
                drain(head, DRAIN_DEADLINE_S)
                noticed = wait_for(lines, "reclaimed (ranks [", train, after=grown)
                wait_for(lines, "[vae] checkpointed at step ", train, after=noticed)
                time.sleep(max(0.0, deadline - 2 - time.monotonic()))  # the pod's preStop hook: gone before it
            resumed = wait_for(lines, "[vae] resuming from ", train, after=noticed)
            shrunk = wait_for(lines, "[vae] 1 worker(s) on 1 node(s)", train, after=resumed)
            train.wait(timeout=600)
        finally:
            train.kill()
            reader.join(timeout=10)
    output = "".join(lines)
    assert train.returncode == 0, output[-3000:]
    assert first < grown < noticed < resumed < shrunk
    # Ray restarts the group at the deadline from the latest checkpoint: the notice's mid-epoch one, or an epoch's
    # the group finished after it (epochs here take 0.2 s; a real epoch outlasts a drain's deadline)
    done_before = [int(line.split("epoch ")[1].split("/")[0]) for line in lines[:noticed] if "[vae] epoch " in line]
    assert resume_point(lines[resumed]) >= (done_before[-1], 1), (lines[noticed - 1], lines[resumed])

    rows = rows_of(tmp_path / "elastic.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # none lost, none repeated
    sizes = [int(float(r["workers"])) for r in rows]
    runs = [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]
    assert runs == [1, 2, 1], sizes  # 1 … 2 … 1: one history

    record = json.loads((tmp_path / "models/elastic/mlflow_run.json").read_text())
    client = MlflowClient(mlflow_uri)
    steps = [m.step for m in client.get_metric_history(record["run_id"], "val_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # every epoch logged exactly once
    # MLflow holds the epochs the checkpoints kept (Ray Train's controller logs them): an epoch a resize cut off
    # after rank 0 had reported it is not there beside its retrained twin
    logged = {m.step: m.value for m in client.get_metric_history(record["run_id"], "workers")}
    assert [logged[epoch] for epoch in range(1, epochs + 1)] == sizes

    elastic_loss = json.loads((tmp_path / "elastic.json").read_text())["val_neg_elbo"]
    assert abs(elastic_loss - fixed_loss) / fixed_loss < TOLERANCE, (elastic_loss, fixed_loss)
