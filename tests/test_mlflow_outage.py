"""A tracking server that is down when a stage starts (one clear line, before Ray starts, in seconds rather than
MLflow's minutes of retries) or lost during training (training goes on, the epochs it missed and the model are
logged by the next attempt, which does not train again)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from conftest import start_mlflow_server, stop_mlflow_server

from latentzoo.errors import LatentzooError, TrainingError
from latentzoo.local_cluster import free_port
from latentzoo.tracking import mlflow_runs
from latentzoo.tracking.runs import RUN_RECORD
from latentzoo.training import trainer
from latentzoo.training.trainer import TrainOutputs, train_model


def outputs(tmp_path) -> TrainOutputs:
    return TrainOutputs(tmp_path / "models/vae", tmp_path / "metrics/vae.json", tmp_path / "plots/vae.csv")


def test_a_server_that_is_down_at_start_is_one_clear_line_before_ray_starts(
    digits_shards, tiny_params, tmp_path, monkeypatch
):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny_params(**{"train.num_workers": 1, "ray.storage_path": str(tmp_path / "ray")})
    started = time.monotonic()
    with pytest.raises(
        LatentzooError,
        match=rf"MLflow tracking server {uri} does not answer \(ConnectionError\); "
        r"start it .* or run untracked with tracking\.enabled: false",
    ):
        train_model(params, "vae", digits_shards, outputs(tmp_path), root=tmp_path)
    assert time.monotonic() - started < 30  # MLflow's own client retries for about four minutes
    assert list(tmp_path.iterdir()) == []  # no Ray run, model, metrics or plots


def test_a_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes connections; nobody reads or replies
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(LatentzooError, match=r"does not answer \(no answer in 0\.5 s\)"):
            mlflow_runs.check_reachable(uri, timeout_s=0.5)


def test_the_stage_mlflow_client_settings_reach_the_processes_that_log_for_it(monkeypatch):
    """Ray Train's controller logs each epoch: it obeys the stage's MLflow retry and timeout settings (with MLflow's
    default 7 retries, a lost server held each epoch's logging for about two minutes there). Credentials stay out
    of the runtime env, and a submitted job's own env vars are not set twice (Ray refuses that)."""
    from latentzoo.training.cluster import JOB_CONFIG_ENV, forwarded_env

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    env = forwarded_env()
    assert {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}.items() <= env.items()
    assert env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "1" and "MLFLOW_TRACKING_PASSWORD" not in env

    job = {"runtime_env": {"env_vars": {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "PYTHONPATH": "/code/src"}}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in forwarded_env()
    assert forwarded_env()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


@pytest.mark.ray
def test_a_server_lost_during_training_costs_nothing(
    ray_cluster, digits_shards, tiny_params, tmp_path, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast once the server is gone
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = start_mlflow_server(tmp_path, port)
    real_fit = trainer.fit

    def fit_after_the_server_dies(*args, **kwargs):
        stop_mlflow_server(server)  # the run is open; every epoch of the training now fails to log
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trainer, "fit", fit_after_the_server_dies)
    params = tiny_params(**{"train.num_workers": 1, "ray.storage_path": str(tmp_path / "ray")})
    out = outputs(tmp_path)
    try:
        with pytest.raises(
            TrainingError,
            match=rf"training vae finished, but logging it to MLflow at {uri} failed"
            r".*run the stage again once the server answers",
        ):
            train_model(params, "vae", digits_shards, out, root=tmp_path)
        assert "warning: MLflow logging of epoch 2 failed" in capfd.readouterr().out  # training went on
        run_id = json.loads((out.model_dir / "mlflow_run.json").read_text())["run_id"]

        server = start_mlflow_server(tmp_path, port)  # back, with the same store
        monkeypatch.setattr(trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
        final = train_model(params, "vae", digits_shards, out, root=tmp_path)
        assert final["epochs"] == 2
        assert "logged 2 epoch(s) MLflow had missed" in capfd.readouterr().out
        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "val_loss")] == [1, 2]
        assert json.loads((out.model_dir / "mlflow_run.json").read_text())["model_version"] == "1"
    finally:
        stop_mlflow_server(server)


@pytest.mark.ray
def test_a_server_lost_during_a_search_costs_no_trial(
    ray_cluster, digits_shards, tiny_params, tmp_path, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from latentzoo.tuning import search

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = start_mlflow_server(tmp_path, port)
    real_tuner = search.make_tuner

    def tuner_after_the_server_dies(*args, **kwargs):
        stop_mlflow_server(server)  # the search's run is open; no trial can open its own
        return real_tuner(*args, **kwargs)

    monkeypatch.setattr(search, "make_tuner", tuner_after_the_server_dies)
    params = tiny_params(**{"tune.num_samples": 2, "tune.epochs": 1, "ray.storage_path": str(tmp_path / "ray")})
    out = tmp_path / "best.yaml"
    try:
        with pytest.raises(
            TrainingError,
            match=rf"tune vae finished, but logging it to MLflow at {uri} failed.*restores the search and only logs",
        ):
            search.tune_model(params, "vae", digits_shards, out, root=tmp_path)
        assert not out.exists()  # the stage is not done: DVC runs it again
        deadline = time.monotonic() + 30  # the trials' lines reach the driver's console asynchronously
        printed = ""
        while printed.count("the search goes on") < 2 and time.monotonic() < deadline:
            printed += capfd.readouterr().out
            time.sleep(0.5)
        assert printed.count("warning: MLflow logging failed") >= 2, printed[-3000:]

        tried = sorted(p.name for p in (tmp_path / "ray").glob("*/run_trial_*"))
        assert len(tried) == 2

        server = start_mlflow_server(tmp_path, port)  # back, with the same store
        monkeypatch.setattr(search, "make_tuner", real_tuner)
        best = search.tune_model(params, "vae", digits_shards, out, root=tmp_path)
        assert "logged 2 trial run(s) MLflow had missed" in capfd.readouterr().out
        assert sorted(p.name for p in (tmp_path / "ray").glob("*/run_trial_*")) == tried  # restored, none run again
        parent = json.loads((Path(best["experiment"]) / RUN_RECORD).read_text())
        client = MlflowClient(uri)
        assert client.get_run(parent["run_id"]).info.status == "FINISHED"
        trials = client.search_runs(
            [client.get_run(parent["run_id"]).info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent['run_id']}'",
        )
        assert len(trials) == 2 and best["best_trial"] in {t.data.tags["latentzoo.trial_id"] for t in trials}
        assert all(t.info.status == "FINISHED" and "val_loss" in t.data.metrics for t in trials)
    finally:
        stop_mlflow_server(server)
