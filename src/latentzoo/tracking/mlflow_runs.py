"""The MLflow connection latentzoo stages share: where runs are stored, and one client checked once per process.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latentzoo.errors import LatentzooError
from latentzoo.storage import project_root


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = project_root(root)
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


def client(uri: str):
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, root: Path | None = None) -> str:
    """Get or create an experiment; local stores keep artifacts in <project>/mlartifacts/<name>."""
    mlflow = client(uri)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            location = (project_root(root) / "mlartifacts" / name).as_uri()
        return mlflow.create_experiment(name, artifact_location=location)
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
