"""params.yaml → typed, validated config, loaded once.

Every section is a strict pydantic model (`Section`): unknown keys, wrong types and out-of-range values are
rejected with a message naming the key and the value, e.g. ``train.lr must be > 0, got -1``, before Ray or
anything else starts. Each model family brings its own section (its config class in ``latentzoo.models``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from latentzoo import params_reads
from latentzoo.errors import ConfigError
from latentzoo.models import REGISTRY
from latentzoo.models.resvae_gan import ResVAEGANConfig
from latentzoo.models.stacked_ae import StackedAEConfig
from latentzoo.models.vae import VAEConfig
from latentzoo.models.vqvae import SimVQConfig, VQVAEConfig
from latentzoo.schema import Section


class DataConfig(Section):
    """Where images come from and how they are split (prepare stage)."""

    source: Literal["digits", "idx", "imagefolder"] = "digits"
    path: str | None = None  # idx: folder of *-images-idx3-ubyte[.gz] + labels; imagefolder: one sub-folder per class
    image_size: int | None = Field(default=None, ge=4, le=1024)  # imagefolder: resize to image_size x image_size
    channels: Literal[1, 3] | None = None  # imagefolder: 1 grey, 3 RGB; None: RGB if any image has colour
    on_error: Literal["raise", "skip"] = "raise"  # skip: unreadable files are skipped and counted in the manifest
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    keep_source_test: bool = True  # idx: use the source's own test files (t10k-*) as the test split
    limit: int | None = Field(default=None, ge=10)  # keep only the first N images (quick runs)
    max_pixels: int = Field(default=16_000_000, ge=1)  # larger images are refused (decompression bombs)
    max_idx_mb: int = Field(default=8192, ge=1)  # idx: a file declaring more data is refused (gzip bombs)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class ShardConfig(Section):
    """WebDataset shard writing (shard stage)."""

    maxcount: int = Field(default=500, ge=1)  # samples per shard
    # null: the tars go in the stage's output folder; s3://bucket/prefix (any URI pyarrow opens): they go there,
    # the output folder keeps only the manifest (which names the URI) and training streams from there
    uri: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ShardConfig:
        if self.uri is not None and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+(/\S*)?", self.uri):
            raise ValueError(f"shard.uri must be a URI such as s3://bucket/prefix, got {self.uri!r}")
        return self


class TrainConfig(Section):
    """Ray Train TorchTrainer settings shared by every model family (train stage)."""

    # A number (0: Ray Train local mode, the loop runs in the driver process), or [min, max]: an elastic worker
    # group that starts with min workers, grows to max as resources appear and shrinks when a node goes.
    num_workers: int | list[int] = 2
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes
    use_gpu: bool = False
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)  # per worker (at the largest worker count)
    global_batch_size: int | None = Field(default=None, ge=1)  # None: batch_size x the largest worker count
    elastic_resize_interval_s: float = Field(default=60.0, gt=0)  # [min, max] workers: how often to consider a resize
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr·(1 + cos(π·epoch/epochs))/2 per epoch
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    max_failures: int = Field(default=2, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)  # per worker; None: cores // workers
    shuffle_buffer: int = Field(default=1000, ge=0)  # streaming: blocks gathered to >= this many images, permuted
    cache_mb: int = Field(default=2048, ge=0)  # decoded shards kept once per node if train+val fit (0: never)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    # Ask Ray Train every this many steps whether a node of the worker group is being reclaimed (drained); the first
    # notice saves a checkpoint mid-epoch, which the restarted group resumes from (0: only the epochs' checkpoints).
    preemption_check_steps: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _check_workers(self) -> TrainConfig:
        workers = self.num_workers
        if isinstance(workers, list) and not (len(workers) == 2 and 1 <= workers[0] <= workers[1]):
            raise ValueError(f"train.num_workers must be a number or [min, max] with 1 <= min <= max, got {workers}")
        if isinstance(workers, int) and workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {workers}")
        if self.global_batch < max(1, self.max_workers):
            raise ValueError(
                f"train.global_batch_size {self.global_batch} gives some of the {self.max_workers} workers no images"
            )
        return self

    @property
    def elastic(self) -> bool:
        """[min, max] workers: Ray Train resizes the worker group as the cluster's resources change."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all workers, the same whatever the worker group's size: a resize changes
        the per-worker batch, never the optimisation."""
        return self.global_batch_size or self.batch_size * max(1, self.max_workers)


class FinetuneConfig(Section):
    """Supervised fine-tuning of the pretrained stack (finetune stage), beside its random-init baseline and a linear
    probe of the frozen pretrained features; all three with the same epochs and labelled images."""

    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    dropout: float = Field(default=0.1, ge=0, lt=1)  # on every hidden layer's output h_1..h_L
    input_corruption: float = Field(default=0.0, ge=0, lt=1)  # fraction of pixels masked to 0 (no rescaling)
    max_shift: int = Field(default=0, ge=0, le=8)  # each image moved by a random offset of up to this many pixels
    label_fraction: float = Field(default=1.0, gt=0, le=1)  # of the training images whose labels are used
    baseline: bool = True  # also fine-tune the same network from random initialisation
    probe: bool = True  # also train a linear classifier on the frozen pretrained features


class ClassifierConfig(Section):
    """The feature classifier of the Fréchet classifier distance (classifier stage, `evaluation.feature_classifier`)."""

    width: int = Field(default=32, ge=1)
    feature_dim: int = Field(default=128, ge=2)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    num_samples: int = Field(default=2000, ge=2)  # generated images per FCD, against as many real test images


class EvaluateConfig(Section):
    """Held-out evaluation (evaluate stage)."""

    batch_size: int = Field(default=256, ge=1)
    grid_size: int = Field(default=64, ge=1, le=1024)  # images per reconstruction / sample grid
    active_unit_threshold: float = Field(default=0.01, gt=0)  # Burda et al. 2015: Cov_x(E_q[z_d]) > threshold
    nll_samples: int = Field(default=200, ge=0)  # k of the importance-sampled NLL (IWAE bound); 0: not computed


class TrackingConfig(Section):
    """MLflow: the tracking URI comes from MLFLOW_TRACKING_URI, else a sqlite store inside the project."""

    enabled: bool = True
    experiment_prefix: str = Field(default="latentzoo", min_length=1)
    log_models: bool = True  # the train stage logs its model (PyTorch flavour) and registers it as latentzoo-<model>


class RayConfig(Section):
    """The Ray cluster: RAY_ADDRESS selects an existing one, else a local one is started with these limits."""

    num_cpus: int | None = Field(default=None, ge=1)
    storage_path: str | None = None  # Ray Train checkpoints; None: <project>/.ray_results
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "ERROR"  # Ray's own logs from its worker processes
    # How long Ray Train waits for a worker group's resources before trying again: long enough for a busy machine
    # (Ray's default, 60 s, is not); an elastic run that restarts at a size a lost node no longer allows waits
    # this long before it tries the size the cluster has now.
    worker_start_timeout_s: float = Field(default=600.0, gt=0)


class SearchRange(Section):
    """One searched loss weight: uniform on [low, high], or log-uniform with `log: true`."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> SearchRange:
        if self.high <= self.low:
            raise ValueError(f"high must be > low, got low {self.low} and high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 for a log range, got {self.low}")
        return self


class TuneConfig(Section):
    """Ray Tune search of loss weights (tune stage): ASHA early stopping and a model-based searcher."""

    enabled: bool = True  # false: no search, the train stage uses params.yaml's weights as they are
    num_samples: int = Field(default=4, ge=1)  # trials per model
    epochs: int = Field(default=3, ge=1)  # per trial: ASHA's max_t
    grace_period: int = Field(default=1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(default=2.0, gt=1)
    searcher: Literal["optuna", "random"] = "optuna"  # optuna: TPE; random: Tune's random search
    cpus_per_trial: int = Field(default=1, ge=1)  # each trial trains in one process with this many threads
    max_concurrent_trials: int | None = Field(default=None, ge=1)  # None: cluster CPUs // cpus_per_trial
    space: dict[str, dict[str, SearchRange]] = Field(default_factory=dict)  # {model: {loss weight: range}}

    def space_for(self, model: str) -> dict[str, SearchRange]:
        """`model`'s search ranges (empty: nothing to search), read as the one key tune.space.<model>."""
        params_reads.note(self, f"space.{model}")
        return self.__dict__["space"].get(model, {})


# Knobs that change how a stage runs, not what it computes: no stage lists them in dvc.yaml's params, so changing
# one re-runs nothing (tests/test_lineage.py checks dvc.yaml against this list and params.yaml's keys).
RUNTIME_KEYS = (
    "ray",
    "tracking",
    "train.placement_strategy",
    "train.max_failures",
    "train.torch_threads",
    "train.checkpoints_to_keep",
    "train.elastic_resize_interval_s",
    "train.preemption_check_steps",
)


class Params(Section):
    """Every section of params.yaml, validated once (`load_params`); derive a changed copy with `updated`."""

    seed: int = Field(default=0, ge=0)
    models: list[str] = Field(default_factory=lambda: ["vae"], min_length=1)
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    tune: TuneConfig = TuneConfig()
    # One section per model family of latentzoo.models.REGISTRY (a test checks that the two agree).
    vae: VAEConfig = VAEConfig()
    vqvae: VQVAEConfig = VQVAEConfig()
    simvq: SimVQConfig = SimVQConfig()
    resvae_gan: ResVAEGANConfig = ResVAEGANConfig()
    stacked_ae: StackedAEConfig = StackedAEConfig()

    @model_validator(mode="after")
    def _known_models(self) -> Params:
        for name in self.models:
            if name not in REGISTRY:
                raise ValueError(f"models: unknown model {name!r}, known: {', '.join(sorted(REGISTRY))}")
            if getattr(REGISTRY[name].config_cls, "own_stages", False):
                raise ValueError(
                    f"models: {name!r} has its own stages (pretrain, finetune) in dvc.yaml; "
                    f"list only the families the train stage trains"
                )
        return self

    @model_validator(mode="after")
    def _a_space_per_model(self) -> Params:
        """dvc.yaml's tune@<model> depends on tune.space.<model> alone, so the key must exist for DVC."""
        missing = [name for name in self.models if name not in self.tune.space]
        if missing:
            raise ValueError(
                f"tune.space: no entry for {', '.join(missing)}; every model in `models` has one (its tune stage "
                f"depends on it): add `{missing[0]}: {{}}` to search nothing"
            )
        return self

    @model_validator(mode="after")
    def _searchable_space(self) -> Params:
        """Every searched key is a float field of its model's section, and both ends of its range are valid."""
        for model, ranges in self.tune.space.items():
            if model not in REGISTRY:
                raise ValueError(f"tune.space: unknown model {model!r}, known: {', '.join(sorted(REGISTRY))}")
            section = self.model_config_for(model)
            for key, bounds in ranges.items():
                field = type(section).model_fields.get(key)
                if field is None or field.annotation is not float:
                    floats = sorted(k for k, f in type(section).model_fields.items() if f.annotation is float)
                    raise ValueError(
                        f"tune.space.{model}.{key} is not a float field of {model} (searchable: {', '.join(floats)})"
                    )
                for end in (bounds.low, bounds.high):
                    try:
                        type(section).model_validate({**section.model_dump(), key: end})
                    except ValidationError as err:
                        raise ValueError(
                            f"tune.space.{model}.{key}: {end} is not a valid {model}.{key} ({err.errors()[0]['msg']})"
                        ) from None
        return self

    def model_config_for(self, name: str) -> Section:
        """The validated section of model family `name` (e.g. params.vae)."""
        return getattr(self, name)

    def updated(self, **changes: Any) -> Params:
        """A copy with dotted keys changed, validated again: `params.updated(**{"train.epochs": 3})`."""
        raw = self.model_dump()
        for dotted, value in changes.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ConfigError(f"params.updated: {dotted} is not a key of params")
                node = node[key]
            node[leaf] = value
        derived = params_reads.derived_keys(self) | set(changes)
        return validate_params(raw, source="params (updated)", derived=derived)


# ---------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 wants 1.0e-3), as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error → 'train.lr must be > 0, got -1'."""
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{key} must be {bounds[kind]} {limit:g}, got {value!r}"
    if kind == "extra_forbidden":
        return f"{key} is not a known key (remove it or check its spelling), got {value!r}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "literal_error":
        return f"{key} must be {ctx.get('expected')}, got {value!r}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))  # our validators already name their keys
        return msg if not key or msg.startswith(key) else f"{key}: {msg}"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{key}: {msg}, got {value!r}"


def validate_params(raw: dict[str, Any], source: str = "params", derived: Iterable[str] = ()) -> Params:
    """Validate a params dict; raise ConfigError listing every problem, one per line. `derived`: the keys code set
    (for `params_reads`, which records what a stage reads)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        with params_reads.paused():
            params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
    params_reads.label(params, derived)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (the one place config is parsed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as exc:  # a directory, no read permission
        raise ConfigError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: nested too deeply to be a params file") from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # PyYAML's constructors raise these for a scalar its tag cannot hold: `!!int x`, `seed: 2001-13-45`
        raise ConfigError(f"{path}: a value does not fit its YAML type ({type(exc).__name__}: {exc})") from None
    return validate_params(raw, source=str(path))
