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
from dataclasses import dataclass, field, replace
from pathlib import Path

from latentzoo.checkpoint import CHECKPOINT_FILE, load_state
from latentzoo.config import Params
from latentzoo.data.cache import NodeCache
from latentzoo.data.loader import count_labelled, decoded_bytes
from latentzoo.data.shards import checked_shards, sha256_file
from latentzoo.errors import ConfigError, ShardError, TrainingError, disk_full
from latentzoo.faults import planned
from latentzoo.models import build_model
from latentzoo.storage import RunFolder, project_root, storage_location
from latentzoo.tracking.runs import TrackedRun, log_shards
from latentzoo.training.cluster import check_ray_address, check_resources, clear_node_caches, connect_ray
from latentzoo.training.loop import EpochLogger, TrainJob, say, train_loop_per_worker
from latentzoo.training.outputs import TrainOutputs, finish_mlflow_run, write_outputs

DONE_MARKER = "latentzoo_complete"


@dataclass(frozen=True)
class Phase:
    """One run of a multi-run recipe, e.g. layer k of greedy pretraining, or a fine-tune from given weights."""

    name: str  # "layer-2", "finetune-pretrained": part of the Ray run name, the MLflow run name
    model_args: dict = field(default_factory=dict)  # model.set_phase(**model_args)
    init_weights: Path | None = None  # a weights file the run starts from
    label_fraction: float = 1.0  # train on this fraction of the labelled training images
    parent: TrackedRun | None = None  # MLflow: the run is nested under this one

    def identity(self) -> dict:
        """What makes two phases the same run (the weights by content, not by path)."""
        weights = sha256_file(self.init_weights) if self.init_weights else None
        return {"name": self.name, "args": self.model_args, "init": weights, "labels": self.label_fraction}


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


def node_cache(manifest: dict, manifest_sha: str, urls: dict[str, list[str]], cache_mb: int) -> NodeCache | None:
    """The node cache of the decoded train and val splits (`urls`), if they fit the per-node budget
    `train.cache_mb`."""
    shards = [
        (url, entry["count"])
        for split in ("train", "val")
        for url, entry in zip(urls[split], manifest["splits"][split]["shards"])
    ]
    size = decoded_bytes(sum(count for _, count in shards), manifest["image_shape"])
    return NodeCache.of(manifest_sha, shards, size) if size <= cache_mb * 2**20 else None


@dataclass(frozen=True)
class TrainingData:
    """The checked train and val shards of one dataset, as the workers need them."""

    train_urls: list[str]
    val_urls: list[str]
    num_train: int
    image_shape: tuple[int, int, int]
    manifest_sha: str
    cache: NodeCache | None

    def job(self, params: Params, model_name: str, run: TrackedRun | None = None) -> TrainJob:
        return TrainJob(
            model_name=model_name,
            seed=params.seed,
            train=params.train,
            model_config=params.model_config_for(model_name),
            train_urls=self.train_urls,
            val_urls=self.val_urls,
            num_train=self.num_train,
            image_shape=self.image_shape,
            cache=self.cache,
            run=run,
        )


def training_data(params: Params, model_name: str, shard_dir: Path) -> TrainingData:
    """Verify the shards (sha256) and that the workers and the model fit them, before Ray starts."""
    shard_dir = Path(shard_dir).resolve()
    manifest, urls = checked_shards(shard_dir, ("train", "val"))  # before any worker starts
    train_urls, val_urls = urls["train"], urls["val"]
    if params.train.max_workers > len(train_urls):
        raise ShardError(
            f"{shard_dir}/manifest.json: the train split has {len(train_urls)} shard(s) but train.num_workers is "
            f"{params.train.num_workers}; lower shard.maxcount so every worker gets a shard"
        )
    image_shape = tuple(manifest["image_shape"])
    build_model(model_name, params.model_config_for(model_name), image_shape)  # config errors before Ray starts
    manifest_sha = sha256_file(shard_dir / "manifest.json")
    return TrainingData(
        train_urls,
        val_urls,
        manifest["splits"]["train"]["count"],
        image_shape,
        manifest_sha,
        node_cache(manifest, manifest_sha, urls, params.train.cache_mb),
    )


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


def phase_job(job: TrainJob, phase: Phase, seed: int) -> TrainJob:
    """The job of one phase: its model arguments, initial weights and label budget (num_train counts the budget)."""
    num_train = job.num_train
    if phase.label_fraction < 1:
        num_train = count_labelled("train", job.num_train, phase.label_fraction, seed)
        if num_train == 0:
            raise ConfigError(
                f"finetune.label_fraction {phase.label_fraction} keeps none of the "
                f"{job.num_train} training images; raise it"
            )
    weights = str(Path(phase.init_weights).resolve()) if phase.init_weights else None
    return replace(
        job,
        phase=dict(phase.model_args),
        phase_name=phase.name,
        init_weights=weights,
        label_fraction=phase.label_fraction,
        num_train=num_train,
    )


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
