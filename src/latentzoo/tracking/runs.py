"""One MLflow run a stage writes to, as one object: opened or resumed from its record, logged to, nested, finished.

A stage holds a `TrackedRun`, or None when `tracking.enabled` is false, never a loose (tracking URI, run id) pair.
The run's record, `{"run_id": ..., "tracking_uri": ...}`, is written in two places:

- `latentzoo_mlflow.json` in the Ray run's folder (`RUN_RECORD`): a rerun of an interrupted stage with the same
  inputs finds it there and logs into the same run (`TrackedRun.open`);
- `mlflow_run.json` beside a trained model (`RUN_FILE`, a DVC output): later stages (evaluate, fine-tuning) read
  it back to add their figures to the run that trained the weights (`TrackedRun.load`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentzoo.config import TrackingConfig
from latentzoo.data.shards import MANIFEST, load_manifest, sha256_file
from latentzoo.errors import TrainingError
from latentzoo.storage import RunFolder
from latentzoo.tracking import mlflow_runs

RUN_RECORD = "latentzoo_mlflow.json"  # beside Ray's checkpoints: the MLflow run a rerun resumes
RUN_FILE = "mlflow_run.json"  # beside a trained model: the MLflow run that trained it
RUN_LINK = "mlflow_run.json"  # beside an evaluation's figures: {run_id, url} of the run that trained the model
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`
SYSTEM_METRICS_INTERVAL_S = 2.0  # MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run: where it lives (`uri`) and which it is (`run_id`). Picklable, so a Ray worker logs with it."""

    uri: str
    run_id: str

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        tracking: TrackingConfig,
        folder: RunFolder,
        *,
        family: str,
        name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        root: Path,
        parent: TrackedRun | None = None,
    ) -> TrackedRun | None:
        """The run recorded in `folder` by an interrupted attempt, marked RUNNING again; else a new run in the
        experiment `<prefix>-<family>` (nested under `parent`) with `tags`, the git commit and `params`, recorded
        in `folder`. None when tracking is off."""
        if not tracking.enabled:
            return None
        uri = mlflow_runs.tracking_uri(root)
        saved = cls.from_record(folder.read_text(RUN_RECORD), uri)
        if saved and saved.resume():
            return saved
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent.run_id}
        run = cls.start(uri, f"{tracking.experiment_prefix}-{family}", name, tags, root)
        run.log_params(params)
        folder.write_text(RUN_RECORD, json.dumps(run.record()))
        return run

    @classmethod
    def start(
        cls, uri: str | None, experiment: str, name: str, tags: Mapping[str, str], root: Path | None = None
    ) -> TrackedRun:
        """A new run (RUNNING) in `experiment` with `tags` and the git commit of `root`; `uri` None: the tracking
        URI of the environment, or of the project at `root`."""
        uri = uri or mlflow_runs.tracking_uri(root)
        tags = {**tags, "mlflow.source.git.commit": mlflow_runs.git_commit(root)}
        experiment_id = mlflow_runs.experiment_id(uri, experiment, root)
        return cls(uri, mlflow_runs.client(uri).create_run(experiment_id, run_name=name, tags=tags).info.run_id)

    def resume(self) -> bool:
        """Mark the run RUNNING again (an interrupted stage is rerun); False if it is gone."""
        client = mlflow_runs.client(self.uri)
        try:
            client.get_run(self.run_id)
        except Exception:
            return False
        client.update_run(self.run_id, status="RUNNING")
        return True

    def child(self, experiment: str, name: str, tags: Mapping[str, str], root: Path) -> TrackedRun:
        """A new run nested under this one (e.g. a tune trial under its search)."""
        return TrackedRun.start(self.uri, experiment, name, {**tags, "mlflow.parentRunId": self.run_id}, root)

    # ------------------------------------------------------------ records

    def record(self, **extra: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, **extra}

    @classmethod
    def from_record(cls, record: str | Mapping[str, Any] | None, default_uri: str | None = None) -> TrackedRun | None:
        """The run a record names (its JSON text or dict); None for no record or a record without a run."""
        if not record:
            return None
        if isinstance(record, str):
            record = json.loads(record)
        if not record.get("run_id"):
            return None
        return cls(record.get("tracking_uri") or default_uri or mlflow_runs.tracking_uri(), record["run_id"])

    @classmethod
    def load(cls, path: Path) -> TrackedRun | None:
        """The run recorded in the file `path` (e.g. a model's mlflow_run.json); None if it records none."""
        return cls.from_record(Path(path).read_text()) if Path(path).exists() else None

    @classmethod
    def recorded_in(cls, folder: RunFolder) -> TrackedRun | None:
        """The run recorded in a Ray run's folder, if any."""
        return cls.from_record(folder.read_text(RUN_RECORD))

    # ------------------------------------------------------------ logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested params, flattened ('train.lr'), in batches of 100 (MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in mlflow_runs.flatten(params).items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """The numbers among `metrics` (booleans and strings are skipped), at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        self._client.log_batch(self.run_id, metrics=items)

    def logged_epochs(self, key: str = "val_loss") -> set[int]:
        """The epochs (steps) at which the run holds `key`."""
        return {m.step for m in self._client.get_metric_history(self.run_id, key)}

    def log_missing_epochs(self, history: list[dict], key: str = "val_loss") -> int:
        """Log each history row (step = its epoch) whose epoch has no `key` in the run yet, e.g. the epochs a dead
        worker checkpointed but never logged, or those logged while the server was down; returns how many."""
        logged = self.logged_epochs(key)
        missing = [row for row in history if row["epoch"] not in logged]
        for row in missing:
            self.log_metrics(row, step=row["epoch"])
        return len(missing)

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        """A data input of the run, shown in MLflow's Datasets panel: `name`, a `digest` that changes with the data
        (a content hash), where it is (`source`: a path or URL), how the run used it (`context`: train, val,
        test) and a small `profile` (counts)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        with warnings.catch_warnings():  # a local path matches two equivalent local source types
            warnings.simplefilter("ignore", UserWarning)
            where = resolve_dataset_source(source)
        dataset = Dataset(name, digest, where._get_source_type(), where.to_json(), None, json.dumps(dict(profile)))
        self._client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents under `artifact_path` (default: the folder's name)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def ui_url(self, local_ui: str = LOCAL_UI) -> str:
        """The run's page in the MLflow UI: on the tracking server itself, or, for a local store, on the UI that
        `make mlflow-ui` serves."""
        base = self.uri if self.uri.startswith(("http://", "https://")) else local_ui
        experiment = self._client.get_run(self.run_id).info.experiment_id
        return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"

    @contextmanager
    def system_metrics(self, node_id: str, resume: bool = False) -> Iterator[None]:
        """While the block runs, MLflow's SystemMetricsMonitor samples this machine (CPU, memory, disk, network, and
        NVIDIA GPUs) into the run as `system/<node_id>/...`, steps continuing after a restart when `resume`. A
        monitor that cannot start (the server is down) costs a warning, never the training."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not three INFO lines per worker
        try:
            monitor = SystemMetricsMonitor(
                self.run_id, SYSTEM_METRICS_INTERVAL_S, resume_logging=resume, node_id=node_id, tracking_uri=self.uri
            )
            monitor.start()
        except Exception as err:
            logging.getLogger(__name__).warning("no system metrics for run %s: %s", self.run_id, err)
            monitor = None
        try:
            yield
        finally:
            if monitor:
                monitor.finish()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def children(self) -> list[tuple[TrackedRun, str, dict[str, str]]]:
        """(run, status, tags) of the runs nested under this one (tag mlflow.parentRunId)."""
        experiment = self._client.get_run(self.run_id).info.experiment_id
        found = f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        runs = self._client.search_runs([experiment], found, max_results=10000)
        return [(TrackedRun(self.uri, r.info.run_id), r.info.status, dict(r.data.tags)) for r in runs]

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    @property
    def _client(self):
        return mlflow_runs.client(self.uri)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_shards(run: TrackedRun, shard_dir: Path, splits: tuple[str, ...]) -> None:
    """The shards a stage read as MLflow datasets, one per split (`<folder>-<split>`): digest the manifest's
    sha256 (its first 32 hex digits: what MLflow's digest column holds), source the shard folder."""
    manifest = load_manifest(shard_dir)
    digest = sha256_file(Path(shard_dir) / MANIFEST)
    for split in splits:
        entry = manifest["splits"][split]
        profile = {"images": entry["count"], "shards": len(entry["shards"]), "manifest_sha256": digest}
        run.log_dataset(f"{Path(shard_dir).name}-{split}", digest[:32], str(shard_dir), split, profile)


def logging_failed(what: str, uri: str, err: Exception, kept: str, rerun: str) -> TrainingError:
    """The error of a stage whose work is done and kept (`kept`) but whose final logging to MLflow failed: what the
    next run does (`rerun`) once the server answers."""
    reason = str(err).splitlines()[0][:300] if str(err) else ""
    return TrainingError(
        f"{what} finished, but logging it to MLflow at {uri} failed ({type(err).__name__}: {reason}); {kept}, so run "
        f"the stage again once the server answers ({rerun}), or set tracking.enabled: false"
    )


def record_of(run: TrackedRun | None, **extra: Any) -> dict[str, Any]:
    """The record of `run`, or of no run (tracking off): run_id and tracking_uri null."""
    return run.record(**extra) if run else {"run_id": None, "tracking_uri": None, **extra}
