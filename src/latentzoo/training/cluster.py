"""The driver's Ray cluster: connect to the one at RAY_ADDRESS or start a local one, and check it can run the job.

Shared by the train stage and the tune stage (each trial is a TorchTrainer on the same cluster).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from typing import TYPE_CHECKING

from latentzoo.config import Params
from latentzoo.errors import ConfigError, restore_sigterm

if TYPE_CHECKING:  # the data stages use this module too, and do not load the training data path
    from latentzoo.data.cache import NodeCache

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_START_TIMEOUT_S = 600
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.2
RAY_CONNECT_TIMEOUT_S = 5.0
HEAD_ADDRESS = re.compile(r"(?:https?://)?\[?([\w.\-:]+?)\]?:(\d+)/?")  # a head's GCS, or its job server
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver
# MLflow settings read where Ray's processes log for the stage: the workers' system metrics (…_SAMPLING_INTERVAL),
# and the HTTP client's retries and timeout (…_MAX_RETRIES, …_TIMEOUT), which the per-epoch logging in Ray Train's
# controller obeys; where object storage is (shard.uri: an S3-compatible endpoint, the region). No credentials: a
# runtime env is visible in Ray's dashboard (nodes carry their own, or a role).
FORWARDED_PREFIXES = (
    "MLFLOW_SYSTEM_METRICS_",
    "MLFLOW_HTTP_REQUEST_",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def connect_ray(
    num_cpus: int | None = None, log_level: str = "ERROR", start_timeout_s: float = WORKER_START_TIMEOUT_S
) -> None:
    """Use the cluster at RAY_ADDRESS when set, else start a local one (once per process).

    `log_level` applies to Ray's loggers in this job's processes: Ray Train logs every report at INFO and, without
    a dashboard, warns every few seconds that its state API is unavailable. Below INFO, Ray Train's own worker
    logging setup (which ignores RunConfig's LoggingConfig on the console here) is switched off, so the console
    shows our one line per epoch and Ray's errors.
    """
    import ray

    if ray.is_initialized():
        return
    # A busy laptop can take over Ray Train's default 60 s to start a worker group; waiting longer beats failing
    # the run (`ray.worker_start_timeout_s`). Tune trials read it from the job's runtime env.
    os.environ.setdefault(START_TIMEOUT_ENV, f"{start_timeout_s:g}")
    # Ray Train's controller polls its workers every 2 s by default, and each epoch's report (and the end of the
    # run) waits for that poll: ~1.5 s per epoch and ~5 s per run on top of sub-second epochs here. Poll faster.
    os.environ.setdefault(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S))
    env_vars = forwarded_env()
    if log_level in ("WARNING", "ERROR"):
        env_vars["RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING"] = "0"
    options = {
        "logging_level": "WARNING",
        "logging_config": ray.LoggingConfig(log_level=log_level),
        "runtime_env": {"env_vars": env_vars},
    }
    address = os.environ.get("RAY_ADDRESS")
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        check_ray_address(address)
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
    restore_sigterm(sigterm)


def forwarded_env() -> dict[str, str]:
    """The variables of this process that Ray's processes for this job need too: Ray Train's timeouts, the MLflow
    settings above, and RAY_ADDRESS when it names a head (host:port): Ray Train's controller asks the cluster's
    state API whether its actors live, and without an address Ray looks for the cluster on the machine and fails
    where two run ("Found multiple active Ray instances", a traceback when a stage is stopped). A submitted job's
    own runtime env reaches every process already, and Ray refuses a ray.init runtime env that sets a name the
    job's sets, so those are left out."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    names = [START_TIMEOUT_ENV, POLL_INTERVAL_ENV, *(n for n in os.environ if n.startswith(FORWARDED_PREFIXES))]
    if HEAD_ADDRESS.fullmatch(os.environ.get("RAY_ADDRESS", "")):
        names.append("RAY_ADDRESS")
    return {name: os.environ[name] for name in names if name in os.environ and name not in job.get("env_vars", {})}


def check_ray_address(address: str | None = None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A ConfigError within seconds when RAY_ADDRESS (host:port of a head's GCS, or http(s)://host:port of its job
    server) names no listening head: `ray.init` would retry for a minute and end in a traceback. Unset, or other
    forms (`auto`, `ray://...`), are left to Ray."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    found = HEAD_ADDRESS.fullmatch(address)
    if not found:
        return
    host, port = found.group(1), int(found.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = f"no answer in {timeout_s:g} s" if isinstance(err, TimeoutError) else err.strerror or repr(err)
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray head answers there ({reason}); start the cluster "
            f"(ray start --head, or make repro's local head) or unset RAY_ADDRESS to run on a local one"
        ) from None


def check_resources(params: Params) -> None:
    """On a local cluster, refuse a worker count the machine cannot place (it would wait forever)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if params.train.min_workers > cpus:  # an elastic group starts with its minimum
        raise ConfigError(
            f"train.num_workers must be <= the {cpus} CPUs of the local Ray cluster, got {params.train.num_workers}"
        )


def clear_node_caches(cache: NodeCache | None, timeout_s: float = 10.0) -> None:
    """Remove a run's decoded-shard cache (`latentzoo.data.cache`) here and on every other node of the cluster, by a
    zero-CPU task pinned to each; waits at most `timeout_s` (a node that does not answer keeps its folder until
    the next run of the same data reuses it, or a reboot)."""
    if cache is None:
        return
    cache.clear()
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    clear = ray.remote(num_cpus=0, max_retries=0)(type(cache).clear)
    pending = [
        clear.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(cache)
        for node in others
    ]
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
