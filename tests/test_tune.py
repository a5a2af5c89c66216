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
from latentzoo.tuning.search import tune_model

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


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import make_params, TINY
from latentzoo.tuning.search import tune_model
params = make_params(**{{**TINY, **{overrides!r}}})
tune_model(params, "vae", Path({shards!r}), Path({out!r}), root=Path({root!r}))
"""


def finished_trials(experiment: Path, epochs: int) -> int:
    return sum(len(p.read_text().splitlines()) >= epochs for p in experiment.glob("run_trial_*/result.json"))


@pytest.mark.timeout(900)
def test_interrupted_search_resumes_with_tuner_restore(ray_cluster, digits_shards, tmp_path, mlflow_uri):
    import ray

    overrides = {
        **SEARCH,
        "tune.searcher": "random",
        "tune.max_concurrent_trials": 1,
        "ray.storage_path": str(tmp_path / "ray"),
    }
    out = tmp_path / "best.yaml"
    script = DRIVER.format(
        tests=str(Path(__file__).parent),
        overrides=overrides,
        shards=str(digits_shards),
        out=str(out),
        root=str(tmp_path),
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    experiments = []
    while time.monotonic() < deadline and driver.poll() is None:
        experiments = list((tmp_path / "ray").glob("tune-vae-*/experiment_state-*.json"))
        if experiments and finished_trials(experiments[0].parent, 2) >= 1:
            break
        time.sleep(2)
    assert driver.poll() is None, "the search ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-search, like a killed `dvc repro`
    driver.wait()
    assert not out.exists()
    experiment = experiments[0].parent
    done_before = {
        p.parent.name for p in experiment.glob("run_trial_*/result.json") if len(p.read_text().splitlines()) >= 2
    }

    from conftest import TINY, make_params

    best = tune_model(make_params(**{**TINY, **overrides}), "vae", digits_shards, out, root=tmp_path)

    assert best["trials"]["total"] == 3 and best["experiment"] == str(experiment)
    for name in done_before:  # a trial finished before the kill is not run again
        assert len((experiment / name / "result.json").read_text().splitlines()) == 2
    assert json.loads((experiment / "latentzoo_mlflow.json").read_text())["run_id"]
