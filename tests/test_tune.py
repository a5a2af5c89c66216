"""The tune stage on tiny digits: a 3-trial search with one errored trial, MLflow parent and nested runs, the best
weights on disk; and an interrupted search that resumes with Tuner.restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from latentzoo import faults
from latentzoo.tuning.search import TUNE_SIGINT_ENV, stop_on_signals, tune_model

pytestmark = pytest.mark.ray

SEARCH = {"tune.num_samples": 3, "tune.epochs": 2, "tune.searcher": "optuna", "train.shuffle_buffer": 0}


def test_search_survives_an_errored_trial_and_records_the_best(
    ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_uri, monkeypatch
):
    monkeypatch.setenv(faults.ENV, "tune.trial=2")
    params = tiny_params(**SEARCH, **{"ray.storage_path": str(tmp_path / "ray")})
    out = tmp_path / "tune/vae/best.yaml"
    best = tune_model(params, "vae", digits_shards, out, root=tmp_path)

    assert yaml.safe_load(out.read_text()) == best
    assert best["searched"] and best["metric"] == "val_neg_elbo" and best["best_value"] > 0
    assert best["trials"]["total"] == 3 and best["trials"]["errored"] == 1
    low, high = params.tune.space["vae"]["beta"].low, params.tune.space["vae"]["beta"].high
    assert set(best["weights"]) == {"beta"} and low <= best["weights"]["beta"] <= high

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("latentzoo-vae").experiment_id], "tags.`latentzoo.stage` = 'tune'"
    )[0]
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["best.beta"]) == pytest.approx(best["weights"]["beta"])
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = sorted(t.info.status for t in trials)
    assert len(trials) == 3 and statuses.count("FAILED") == 1 and "RUNNING" not in statuses
    stopped = [t for t in trials if t.data.tags.get("latentzoo.stopped_early") == "true"]
    assert len(stopped) == best["trials"]["stopped_early"] and all(t.info.status == "KILLED" for t in stopped)
    tagged = [t for t in trials if t.data.tags.get("latentzoo.best_trial") == "true"]
    assert len(tagged) == 1 and client.get_metric_history(tagged[0].info.run_id, "val_neg_elbo")


def test_no_search_space_means_params_yaml_weights(digits_shards, tiny_params, tmp_path):
    params = tiny_params(**{"tune.enabled": False})
    best = tune_model(params, "vae", digits_shards, tmp_path / "best.yaml", root=tmp_path)
    assert best == {"model": "vae", "searched": False, "reason": "tune.enabled is false", "weights": {}}


def test_ctrl_c_and_sigterm_are_passed_on_to_tune_and_remembered():
    """Inside `stop_on_signals`, with a stand-in for Tune's SIGUSR1 handler: each signal reaches it and is recorded,
    Tune's own Ctrl-C handler is switched off, a second Ctrl-C gets the handler from before, and every handler and
    the environment are as before afterwards."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    to_tune = []
    with stop_on_signals() as received:
        assert os.environ[TUNE_SIGINT_ENV] == "1"
        signal.signal(signal.SIGUSR1, lambda signum, frame: to_tune.append(signum))  # as Tune.fit installs it
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert received == {signal.SIGINT, signal.SIGTERM} and to_tune == [signal.SIGUSR1, signal.SIGUSR1]
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # a second Ctrl-C acts at once
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert TUNE_SIGINT_ENV not in os.environ


def test_a_signal_before_tune_is_running_stops_at_once():
    with pytest.raises(KeyboardInterrupt), stop_on_signals() as received:
        signal.raise_signal(signal.SIGINT)
    assert received == {signal.SIGINT}


def finished_trials(experiment: Path, epochs: int) -> int:
    return sum(len(p.read_text().splitlines()) >= epochs for p in experiment.glob("run_trial_*/result.json"))


def signal_masks(pid: int) -> str:
    """The process's blocked, ignored and caught signals (/proc/<pid>/status), or '' where /proc has none."""
    status = Path(f"/proc/{pid}/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def trial_ids(experiment: Path) -> set[str]:
    return {json.loads(line)["trial_id"] for p in experiment.glob("run_trial_*/result.json") for line in p.open()}


@pytest.mark.timeout(900)
def test_an_interrupted_search_is_not_finished_and_resumes_its_trials(ray_cluster, digits_shards, tmp_path, mlflow_uri):
    """SIGTERM mid-search, to the real stage script: exit 143, no best weights, the MLflow run not FINISHED; the
    next attempt continues the same search (`Tuner.restore`): the trials that had finished are not run again, and
    every trial of the first attempt is one of the search's. (Ctrl-C reaches Tune the same way, through
    `stop_on_signals`: the two tests above; tests/test_interrupt_dag.py stops the tune stage with a Ctrl-C once
    its search has ended.)"""
    import ray
    from conftest import ROOT, TINY, with_overrides
    from mlflow.tracking import MlflowClient

    # Four epochs a trial and no early stopping: after the first trial ends, the other two still have their whole
    # runs to go, headroom for the poll below on a loaded machine (with 2 epochs and ASHA, two test processes on 2
    # cores once saw all three end before the signal).
    epochs = 4
    overrides = {
        **TINY,
        **SEARCH,
        "tune.epochs": epochs,
        "tune.grace_period": epochs,
        "tune.searcher": "random",
        "tune.max_concurrent_trials": 1,
        "ray.storage_path": str(tmp_path / "ray"),
    }
    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params_file.write_text(yaml.safe_dump(with_overrides(raw, overrides)))
    out = tmp_path / "tune/vae/best.yaml"
    stage = [sys.executable, str(ROOT / "pipelines/tune.py"), "--params", str(params_file), "--model", "vae"]
    stage += ["--shards", str(digits_shards), "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(stage, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    experiments = []
    while time.monotonic() < deadline and driver.poll() is None:
        experiments = [p for p in (tmp_path / "ray").glob("tune-vae-*") if p.is_dir()]
        if experiments and finished_trials(experiments[0], epochs) >= 1:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the search ended before it could be interrupted"
    masks = signal_masks(driver.pid)  # for the message below: a blocked or ignored signal shows here
    driver.send_signal(signal.SIGTERM)  # to the stage alone, as `kill` or a scheduler would
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 143, f"{masks}\n{err[-3000:]}"
    assert not out.exists()
    experiment = experiments[0]
    record = json.loads((experiment / "latentzoo_mlflow.json").read_text())
    assert MlflowClient(mlflow_uri).get_run(record["run_id"]).info.status == "KILLED"
    done_before = {
        p.parent.name for p in experiment.glob("run_trial_*/result.json") if len(p.read_text().splitlines()) >= epochs
    }
    first_ids = trial_ids(experiment)

    again = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    best = yaml.safe_load(out.read_text())
    assert best["trials"]["total"] == 3 and best["experiment"] == str(experiment)
    assert first_ids <= trial_ids(experiment) and len(trial_ids(experiment)) == 3  # the same search, continued
    for name in done_before:  # a trial finished before the interruption is not run again
        assert len((experiment / name / "result.json").read_text().splitlines()) == epochs
    assert json.loads((experiment / "latentzoo_mlflow.json").read_text())["run_id"] == record["run_id"]
    assert MlflowClient(mlflow_uri).get_run(record["run_id"]).info.status == "FINISHED"
