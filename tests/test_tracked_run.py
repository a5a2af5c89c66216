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


# ---------------------------------------------------------------- what teams use MLflow for (#25)


def test_system_metrics_are_sampled_per_node_while_the_block_runs(tmp_path, mlflow_uri, monkeypatch):
    import time

    from latentzoo.tracking import runs

    monkeypatch.setattr(runs, "SYSTEM_METRICS_INTERVAL_S", 0.2)
    run = TrackedRun.start(mlflow_uri, "latentzoo-vae", "train-vae", TAGS, tmp_path)
    with run.system_metrics("node0"):
        time.sleep(1.5)
    metrics = MlflowClient(mlflow_uri).get_run(run.run_id).data.metrics
    assert "system/node0/cpu_utilization_percentage" in metrics
    assert "system/node0/system_memory_usage_megabytes" in metrics
    history = MlflowClient(mlflow_uri).get_metric_history(run.run_id, "system/node0/cpu_utilization_percentage")
    assert len(history) >= 2  # sampled again and again, not once


def test_a_monitor_without_its_run_costs_the_block_nothing(tmp_path, mlflow_uri):
    run = TrackedRun(mlflow_uri, "no-such-run")
    with run.system_metrics("node0", resume=True):
        done = True
    assert done


def test_the_shards_a_run_read_are_its_datasets(tmp_path, mlflow_uri, digits_shards):
    from latentzoo.data.shards import sha256_file
    from latentzoo.tracking.runs import log_shards

    run = TrackedRun.start(mlflow_uri, "latentzoo-vae", "train-vae", TAGS, tmp_path)
    log_shards(run, digits_shards, ("train", "val"))
    log_shards(run, digits_shards, ("test",))
    log_shards(run, digits_shards, ("test",))  # a rerun of evaluate: still one input
    inputs = MlflowClient(mlflow_uri).get_run(run.run_id).inputs.dataset_inputs
    contexts = sorted(t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context")
    assert contexts == ["test", "train", "val"]
    digest = sha256_file(digits_shards / "manifest.json")
    assert {i.dataset.digest for i in inputs} == {digest[:32]}
    train = next(i.dataset for i in inputs if i.dataset.name.endswith("-train"))
    assert str(digits_shards) in train.source and '"images": ' in train.profile


def test_the_champion_alias_moves_only_to_a_better_version(tmp_path, mlflow_uri):
    from latentzoo.tracking.models import CHAMPION, promote_champion

    client = MlflowClient(mlflow_uri)
    client.create_registered_model("latentzoo-vae")
    versions = [client.create_model_version("latentzoo-vae", f"file:///tmp/m{i}").version for i in range(4)]

    def evaluated(version, value):
        client.set_model_version_tag("latentzoo-vae", version, "test_neg_elbo", str(value))
        return promote_champion(mlflow_uri, "latentzoo-vae", version, {"test_neg_elbo": value}, "test_neg_elbo")

    assert evaluated(versions[0], 30.0)  # the first version is the champion
    assert not evaluated(versions[1], 31.0)  # worse: the alias stays
    assert client.get_model_version_by_alias("latentzoo-vae", CHAMPION).version == versions[0]
    assert evaluated(versions[2], 29.5)  # better: the alias moves
    assert not promote_champion(mlflow_uri, "latentzoo-vae", versions[3], {"test_mse": 1.0}, "test_neg_elbo")
    assert client.get_model_version_by_alias("latentzoo-vae", CHAMPION).version == versions[2]
