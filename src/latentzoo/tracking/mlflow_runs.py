"""MLflow runs for latentzoo stages.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (e.g. an ``mlflow server`` shared by a cluster), else a
sqlite store inside the project (``mlflow.db``, artifacts under ``mlartifacts/``). One experiment per model
(``<prefix>-<model>``). Workers log through ``MlflowClient`` with an explicit run id, so a retried worker
group keeps writing to the same run and nothing depends on process-global "active run" state.

A tracking *server* (``http(s)://``) is checked once per process with a single request before MLflow's client
is used: MLflow's own retries take about four minutes to give up on a server that is down. Later requests retry
3 times with a 30 s timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT`` override that), so a server that
dies during training costs each epoch seconds, not minutes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latentzoo.errors import LatentzooError


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
REACHABLE_TIMEOUT_S = 10.0
_answered: set[str] = set()  # the servers that answered this process's first request


def check_reachable(uri: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """Raise a LatentzooError naming the server and the fixes if an http(s) tracking URI does not answer at all
    (any HTTP reply counts, 401 included). Local stores (sqlite, file) are not checked here."""
    if not uri.startswith(("http://", "https://")) or uri in _answered:
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as err:
        reason = f"no answer in {timeout_s:g} s" if isinstance(err, requests.Timeout) else type(err).__name__
        raise LatentzooError(
            f"MLflow tracking server {uri} does not answer ({reason}); start it (infra/mlflow-server.sh) or fix "
            f"MLFLOW_TRACKING_URI, or run untracked with tracking.enabled: false in params.yaml"
        ) from None
    _answered.add(uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, root: Path | None = None) -> str:
    """Get or create an experiment; local stores keep artifacts in <project>/mlartifacts/<name>."""
    client = _client(uri)
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            location = (Path(root or Path.cwd()).resolve() / "mlartifacts" / name).as_uri()
        return client.create_experiment(name, artifact_location=location)
    except Exception as err:  # unreachable server, locked database, ...
        raise LatentzooError(
            f"MLflow at {uri} is not usable ({type(err).__name__}: {err}); "
            f"fix MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str], root: Path | None = None) -> str:
    """Create a run (status RUNNING) and return its id."""
    client = _client(uri)
    exp_id = experiment_id(uri, experiment, root)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


def resume_run(uri: str, run_id: str) -> bool:
    """Mark an existing run RUNNING again (resuming an interrupted training); False if it is gone."""
    client = _client(uri)
    try:
        client.get_run(run_id)
    except Exception:
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params → {'train.lr': '0.001', ...} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
    client = _client(uri)
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
    _client(uri).log_batch(run_id, metrics=items)


def log_missing_epochs(uri: str, run_id: str, history: list[dict], key: str = "val_loss") -> int:
    """Log each history row (step = its epoch) whose epoch has no `key` in the run yet, e.g. the epochs a dead
    worker checkpointed but never logged, or those logged while the server was down; returns how many."""
    logged = {m.step for m in _client(uri).get_metric_history(run_id, key)}
    missing = [row for row in history if row["epoch"] not in logged]
    for row in missing:
        log_metrics(uri, run_id, row, step=row["epoch"])
    return len(missing)


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's contents under `artifact_path` (default: the folder's name)."""
    path = Path(path)
    if path.is_dir():
        _client(uri).log_artifacts(run_id, str(path), artifact_path or path.name)
    else:
        _client(uri).log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def child_runs(uri: str, parent_run_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """(run id, status, tags) of the runs nested under `parent_run_id` (tag mlflow.parentRunId)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
    )
    return [(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs]
