"""What one training run is given: the checked train and val shards (`training_data`), the phase of a multi-run
recipe (`Phase`), and the `TrainJob` that travels to every worker.

The train stage and every tune trial build their job here, on the driver, before Ray starts: a shard that fails
its checksum, a worker count the shards cannot feed or a model section the model rejects is reported then, not
from inside a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from latentzoo.config import Params, TrainConfig
from latentzoo.data.cache import NodeCache
from latentzoo.data.loader import count_labelled, decoded_bytes
from latentzoo.data.shards import checked_shards, sha256_file
from latentzoo.errors import ConfigError, ShardError
from latentzoo.models import build_model
from latentzoo.schema import Section
from latentzoo.tracking.runs import TrackedRun


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs and nothing else (it travels to Ray actors as `train_loop_config`): the train
    section, the model's own section and the seed, already validated, and where the data is."""

    model_name: str
    seed: int
    train: TrainConfig
    model_config: Section  # the family's params section, e.g. params.vae
    train_urls: list[str]
    val_urls: list[str]
    num_train: int
    image_shape: tuple[int, int, int]
    cache: NodeCache | None = None  # the splits fit train.cache_mb: decoded once per node, shared by its workers
    run: TrackedRun | None = None  # the MLflow run of this training (system metrics, per-epoch rows)
    log_epochs: bool = True  # rank 0 logs each epoch's row to `run`; off where Ray Train's controller does
    phase: dict | None = None  # model.set_phase(**phase): one phase of a multi-phase family (stacked_ae)
    phase_name: str = ""  # e.g. "layer-2": names the phase in progress lines and MLflow
    init_weights: str | None = None  # a weights file the run starts from (when it has no checkpoint yet)
    label_fraction: float = 1.0  # train on the samples in the label budget only (num_train counts those)
    fail_at_epoch: int | None = None  # tests only (latentzoo.faults): raise at this epoch unless resumed

    def to_config(self) -> dict:
        """The fields as they are (not `asdict`, which would turn the TrackedRun into a plain dict)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def tag(self) -> str:
        """How progress lines name the run: 'vae', 'stacked_ae layer-2'."""
        return f"{self.model_name} {self.phase_name}".strip()


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
