"""TrackedRun: one object opens or resumes, logs to, nests and finishes an MLflow run, and reads its record back."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from latentzoo.atomic import json_text
from latentzoo.config import TrackingConfig
from latentzoo.storage import RunFolder
from latentzoo.tracking.runs import RUN_RECORD, TrackedRun, record_of

TAGS = {"latentzoo.stage": "train"}


def open_run(folder: RunFolder, tmp_path, tracking: TrackingConfig | None = None):
    return TrackedRun.open(
        tracking or TrackingConfig(),
        folder,
        family="vae",
        name="train-vae",
        tags=TAGS,
        params={"train": {"lr": 0.1}},
        root=tmp_path,
    )


def test_a_run_is_opened_recorded_and_resumed_by_a_rerun(tmp_path, mlflow_uri):
    folder = RunFolder(str(tmp_path / "ray"), "vae-abc")
    run = open_run(folder, tmp_path)
    assert run.uri == mlflow_uri and folder.read_text(RUN_RECORD)
    run.log_metrics({"val_loss": 1.5, "note": "not a number"}, step=1)
    run.finish("FAILED")  # an interrupted attempt

    again = open_run(folder, tmp_path)
    assert again == run  # the same run, RUNNING again
    client = MlflowClient(mlflow_uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "RUNNING" and logged.data.params == {"train.lr": "0.1"}
    assert logged.data.tags["latentzoo.stage"] == "train" and "mlflow.source.git.commit" in logged.data.tags
    assert [m.step for m in client.get_metric_history(run.run_id, "val_loss")] == [1]
    assert again.log_missing_epochs([{"epoch": 1, "val_loss": 1.5}, {"epoch": 2, "val_loss": 1.2}]) == 1


def test_tracking_off_gives_no_run_and_a_null_record(tmp_path, mlflow_uri):
    folder = RunFolder(str(tmp_path / "ray"), "vae-abc")
    assert open_run(folder, tmp_path, TrackingConfig(enabled=False)) is None
    assert folder.read_text(RUN_RECORD) is None
    assert record_of(None) == {"run_id": None, "tracking_uri": None}
    assert TrackedRun.from_record('{"run_id": null, "tracking_uri": null}') is None


def test_records_round_trip_and_children_are_nested(tmp_path, mlflow_uri):
    parent = open_run(RunFolder(str(tmp_path / "ray"), "tune-vae"), tmp_path)
    trial = parent.child("latentzoo-vae", "trial-1", {"latentzoo.trial_id": "t1"}, tmp_path)
    (tmp_path / "mlflow_run.json").write_text(json_text(record_of(trial, model_version="3")))
    assert TrackedRun.load(tmp_path / "mlflow_run.json") == trial
    assert TrackedRun.load(tmp_path / "missing.json") is None
    [(child, status, tags)] = parent.children()
    assert child == trial and status == "RUNNING" and tags["latentzoo.trial_id"] == "t1"
