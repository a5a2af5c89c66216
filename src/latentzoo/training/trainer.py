"""Driver side of training: check the shards, connect to Ray, run the TorchTrainer, write the DVC outputs.

Fault tolerance follows Ray Train V2: a worker failure restarts the worker group (up to
`train.max_failures` times) and the loop resumes from the last reported checkpoint. A driver that was killed
resumes too: the run name is a hash of everything that defines the run (model, params, data), so running the
stage again with the same inputs finds the same `RunConfig(storage_path, name)` and its checkpoints, while any
change of params or data starts a fresh run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from latentzoo.checkpoint import CHECKPOINT_FILE, load_state
from latentzoo.config import Params
from latentzoo.errors import TrainingError, disk_full
from latentzoo.faults import planned
from latentzoo.storage import RunFolder, project_root, storage_location
from latentzoo.tracking.runs import TrackedRun, log_shards
from latentzoo.training.cluster import check_ray_address, check_resources, clear_node_caches, connect_ray
from latentzoo.training.job import Phase, TrainJob, phase_job, training_data
from latentzoo.training.loop import EpochLogger, say, train_loop_per_worker
from latentzoo.training.outputs import TrainOutputs, finish_mlflow_run, write_outputs

DONE_MARKER = "latentzoo_complete"


def run_name(model_name: str, params: Params, manifest_sha: str, prefix: str = "", phase: Phase | None = None) -> str:
    """Deterministic Ray run name: same model, params and data → same name → resume; anything else → fresh.

    With a `prefix` (e.g. "tune-") the tune section takes part too: it names the search of that model. A `phase`
    takes part with its arguments and the content of its initial weights.
    """
    defining = {
        "model": model_name,
        "seed": params.seed,
        "train": params.train.model_dump(exclude={"max_failures", "elastic_resize_interval_s"}),
        "model_config": params.model_config_for(model_name).model_dump(),
        "data": manifest_sha,
    }
    if prefix:
        defining["tune"] = params.tune.model_dump()
    if phase:
        defining["phase"] = phase.identity()
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]
    return f"{prefix}{model_name}-{phase.name + '-' if phase else ''}{digest}"


def train_model(
    params: Params,
    model_name: str,
    shard_dir: Path,
    outputs: TrainOutputs,
    root: Path | None = None,
    phase: Phase | None = None,
) -> dict:
    """Train `model_name` on the shards with Ray Train; write weights, metrics and plots; return final metrics.

    A `phase` trains one step of a multi-run recipe (see `Phase`) as its own Ray run and MLflow run.
    """
    root = project_root(root)
    data = training_data(params, model_name, shard_dir)
    check_ray_address()  # before an MLflow run is opened
    name = run_name(model_name, params, data.manifest_sha, phase=phase)
    storage = storage_location(params.ray.storage_path, root)
    folder = RunFolder(storage, name)
    state = finished_state(folder, params.train.epochs)  # an earlier attempt trained to the end
    model_args = dict(phase.model_args) if phase else None

    def outputs_of(state: dict, fit_seconds: float, run: TrackedRun | None) -> dict:
        shape, urls = data.image_shape, data.val_urls
        return write_outputs(params, model_name, shape, urls, state, outputs, fit_seconds, run, model_args)

    if folder.exists(DONE_MARKER):
        if phase and state:  # a phase an earlier attempt of the same recipe finished (layer 1 before a crash in 2)
            return outputs_of(state, trained_seconds(state), TrackedRun.recorded_in(folder))
        folder.remove()  # a finished run with identical inputs: train again from scratch
        state = None

    run = open_mlflow_run(params, model_name, name, data.manifest_sha, folder, root, phase)
    if run:
        log_shards(run, Path(shard_dir), ("train", "val"))  # MLflow's Datasets panel: what the run trained on
    if state is None:
        state, fit_seconds = fit(params, model_name, data, name, storage, run, phase)
    else:  # then failed before writing its outputs
        fit_seconds = trained_seconds(state)
        say(f"[{model_name}] all {params.train.epochs} epochs are checkpointed in {storage}/{name}: writing outputs")
    final = outputs_of(state, fit_seconds, run)
    if run:
        finish_mlflow_run(params, run, model_name, outputs, state["history"], register=phase is None)
    folder.write_text(DONE_MARKER, "done\n")
    return final


def trained_seconds(state: dict) -> float:
    """The training time a checkpoint's history records (for a run finished by an earlier attempt)."""
    return sum(row["epoch_time_s"] for row in state["history"])


def fit(
    params: Params, model_name: str, data, name: str, storage: str, run: TrackedRun | None, phase
) -> tuple[dict, float]:
    """Run (or resume) the Ray Train run `name`; return its last checkpoint's state and the fit's seconds."""
    from ray.train import TrainingFailedError

    job = replace(data.job(params, model_name, run), fail_at_epoch=planned("train.epoch"), log_epochs=False)
    if phase:
        job = phase_job(job, phase, params.seed)
    connect_ray(params.ray.num_cpus, params.ray.log_level, params.ray.worker_start_timeout_s)
    check_resources(params)
    trainer = make_trainer(params, job, name, storage, callbacks=[EpochLogger(run, job.tag)] if run else [])
    started = time.perf_counter()
    try:
        result = fit_interruptibly(trainer)
    except TrainingFailedError as err:
        if run:
            run.finish("FAILED")
        if "No space left on device" in str(err) or "DiskFullError" in str(err):  # a worker's, through Ray's report
            raise disk_full(
                f"{storage}/{name}", "training wrote its checkpoints", "or set ray.storage_path to a larger filesystem"
            ) from None
        raise TrainingError(
            f"training {model_name} failed after {params.train.max_failures} retries: {root_cause(err)}. "
            f"Checkpoints are kept in {storage}/{name}; run the stage again to resume."
        ) from None
    finally:
        clear_node_caches(job.cache)
    fit_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise TrainingError(f"training {model_name} reported no checkpoint (see {storage}/{name})")
    with result.checkpoint.as_directory() as d:
        return load_state(Path(d) / CHECKPOINT_FILE), fit_seconds


def fit_interruptibly(trainer):
    """`trainer.fit()`, stopped cleanly by Ctrl-C or SIGTERM: the run aborted and its workers stopped before the
    stage exits 130 / 143 (else they train on for a while after the driver is gone, writing checkpoints a rerun
    may race with).

    Ray Train installs a SIGINT handler during fit that aborts the run (its controller stops the workers), then
    exits with status 0; it stays installed after fit, where it would swallow a Ctrl-C while the stage writes its
    outputs. Its exit becomes a KeyboardInterrupt, SIGTERM (our Terminated) calls that same handler to abort the
    run, and the SIGINT handler from before fit is put back."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit:  # only Ray Train's SIGINT handler exits from inside fit
        raise KeyboardInterrupt() from None
    except KeyboardInterrupt:  # our SIGTERM's Terminated (Ray may re-raise it as a plain KeyboardInterrupt)
        abort = signal.getsignal(signal.SIGINT)
        if callable(abort) and abort is not before:  # Ray Train's: aborts the run, then exits
            with contextlib.suppress(Exception, SystemExit):
                abort(signal.SIGINT, None)
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def finished_state(folder: RunFolder, epochs: int) -> dict | None:
    """The final-epoch checkpoint state of a finished run (Ray's checkpoint_* folders), if kept."""
    state = folder.newest_checkpoint_state(CHECKPOINT_FILE)  # read once per stage start: only the newest
    return state if state is not None and state["epoch"] + 1 == epochs else None


def make_trainer(params: Params, job: TrainJob, name: str, storage: str, callbacks=()):
    """The TorchTrainer of one training run (the train stage's, and every tune trial's)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        scaling_config=ScalingConfig(
            num_workers=tuple(params.train.num_workers) if params.train.elastic else params.train.num_workers,
            use_gpu=params.train.use_gpu,
            placement_strategy=params.train.placement_strategy,
            elastic_resize_monitor_interval_s=params.train.elastic_resize_interval_s,
        ),
        torch_config=TorchConfig(backend="nccl" if params.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.train.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level=params.ray.log_level),
            callbacks=list(callbacks),
        ),
    )


def root_cause(err: Exception) -> str:
    """The worker's exception line out of Ray's multi-line error report (the full report is in Ray's logs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def open_mlflow_run(
    params: Params, model_name, name, manifest_sha, folder: RunFolder, root, phase: Phase | None = None
) -> TrackedRun | None:
    """Create the training run (or reopen the one an interrupted attempt of this same run started); a phase's run
    is nested under its parent run."""
    tags = {
        "latentzoo.stage": "train",
        "latentzoo.model": model_name,
        "latentzoo.ray_run": name,
        "latentzoo.data_manifest_sha256": manifest_sha,
    }
    logged = {k: v for k, v in params.model_dump().items() if k != "models"}
    if phase:
        tags["latentzoo.phase"] = phase.name
        init = str(phase.init_weights or "random")
        logged["phase"] = {**phase.model_args, "label_fraction": phase.label_fraction, "init_weights": init}
    title = phase.name if phase else f"train-{model_name}"
    return TrackedRun.open(
        params.tracking,
        folder,
        family=model_name,
        name=title,
        tags=tags,
        params=logged,
        root=root,
        parent=phase.parent if phase else None,
    )
