"""The per-worker training function Ray Train runs on every rank: one loop for every model family.

Each epoch: exactly `steps_per_epoch` batches on every rank (see `latentzoo.data.loader`), a validation pass over
the val shards (sums all-reduced), one line of progress from rank 0, per-epoch metrics to MLflow from rank 0,
and one `ray.train.report` with a checkpoint. On (re)start the loop resumes from `ray.train.get_checkpoint()`.
Every `train.preemption_check_steps` steps it asks Ray Train whether a node of the group is being reclaimed; the
first notice saves a checkpoint mid-epoch (`Preemption`), and a restart resumes at that step.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from latentzoo.checkpoint import CHECKPOINT_FILE, load_state, save_state
from latentzoo.data.cache import NodeCache
from latentzoo.data.loader import eval_batches, steps_per_epoch, train_batches
from latentzoo.ddp import is_distributed
from latentzoo.errors import LatentzooError, quiet_signal_exits
from latentzoo.faults import fail_if_planned
from latentzoo.models import Adversarial, Coded, build_model, frozen
from latentzoo.models.quantizer import CodeCounter
from latentzoo.storage import readable_checkpoints
from latentzoo.tracking.runs import TrackedRun
from latentzoo.training.job import TrainJob


@dataclass(frozen=True)
class Session:
    """Where the loop runs: its rank among the workers, and how it reads and reports checkpoints.

    The train stage runs it on Ray Train workers (`train_session`); a tune trial runs it in the trial's own
    process (`tune_session`). The loop itself is the same code either way.
    """

    rank: int
    world_size: int
    local_world_size: int
    get_checkpoint: Callable[[], Any]
    report: Callable[..., None]  # report(metrics, checkpoint=Checkpoint | None)
    checkpoint_cls: type  # ray.train.Checkpoint or ray.tune.Checkpoint
    prepare_model: Callable[[nn.Module], nn.Module]
    device: torch.device
    node_rank: int | None = None  # set on one worker per node: the one that logs the node's system metrics
    preemption_info: Callable[[], Any] = lambda: None  # Ray Train's notice of a reclaimed node (a collective)


def train_session() -> Session:
    from ray.train.v2.api.context import LocalTrainContext

    ctx = ray.train.get_context()
    return Session(
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ctx.get_local_world_size(),
        ray.train.get_checkpoint,
        keeping_checkpoints(ray.train.report) if isinstance(ctx, LocalTrainContext) else ray.train.report,
        ray.train.Checkpoint,
        ray.train.torch.prepare_model,
        ray.train.torch.get_device(),
        ctx.get_node_rank() if ctx.get_local_rank() == 0 else None,
        ray.train.get_preemption_info,
    )


def keeping_checkpoints(report: Callable[..., None]) -> Callable[..., None]:
    """`report` for Ray Train's local mode (train.num_workers: 0), which keeps a reported checkpoint's folder as it
    is where the distributed mode copies it to storage, and the loop deletes its folder after reporting: report a
    copy instead, kept until the next one replaces it (the run's result is the last)."""
    kept: list[str] = []

    def report_a_copy(metrics, checkpoint=None):
        if checkpoint is not None:
            folder = tempfile.mkdtemp(prefix="lz-local-checkpoint-")
            shutil.copytree(checkpoint.path, folder, dirs_exist_ok=True)
            for old in kept:
                shutil.rmtree(old, ignore_errors=True)
            kept[:] = [folder]
            checkpoint = type(checkpoint).from_directory(folder)
        report(metrics, checkpoint=checkpoint)

    return report_a_copy


def tune_session(use_gpu: bool = False) -> Session:
    import ray.tune

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    return Session(
        0, 1, 1, ray.tune.get_checkpoint, ray.tune.report, ray.tune.Checkpoint, lambda model: model.to(device), device
    )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (takes only `config`, as Ray's examples do)."""
    run_loop(TrainJob(**config), train_session())


def run_loop(job: TrainJob, session: Session) -> None:
    """Train `job` for train.epochs epochs from the session's last checkpoint, reporting one row per epoch."""

    quiet_signal_exits()  # Ray stops a worker with SIGTERM; its exit inside a GC callback is no traceback to show
    train = job.train
    rank, world = session.rank, session.world_size
    # Ray does not set OMP_NUM_THREADS per worker as torchrun does: share the cores out ourselves.
    torch.set_num_threads(train.torch_threads or max(1, (os.cpu_count() or 1) // max(1, session.local_world_size)))

    torch.manual_seed(job.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_model(job.model_name, job.model_config, job.image_shape)
    if job.init_weights:  # e.g. the pretrained stack; a checkpoint below overrides it on resume
        model.load_state_dict(load_state(Path(job.init_weights))["state_dict"])
    if job.phase:
        model.set_phase(**job.phase)  # freezes what this phase does not train
    optimizer = torch.optim.AdamW(model.optimizer_groups(), lr=train.lr, weight_decay=train.weight_decay)
    adversary = Adversary.of(model)
    batch = rank_batch(train.global_batch, rank, world)
    steps = steps_per_epoch(job.num_train, 1, train.global_batch)  # the same whatever the worker count
    start_epoch, history, step, skip = 0, [], 0, 0
    logged: set[int] = set()  # the epochs the MLflow run holds already
    checkpoint = session.get_checkpoint()
    state = resume_state(checkpoint, job.tag if rank == 0 else None) if checkpoint else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if adversary:
            adversary.optimizer.load_state_dict(state["disc_optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        step = state.get("step", start_epoch * steps)  # optimizer steps so far (older checkpoints lack the key)
        skip = state.get("steps_done", 0)  # a preemption's checkpoint: the steps of epoch start_epoch already taken
        if rank == 0:
            at = f"step {skip} of epoch {start_epoch + 1}" if skip else f"the checkpoint of epoch {start_epoch}"
            say(f"[{job.tag}] resuming from {at}")
            if job.run and job.log_epochs:
                logged = log_missing_epochs(job, history)
    model = prepare(session, model, adversary)
    device = session.device
    nodes = count_nodes()
    if rank == 0:
        backend = dist.get_backend() if is_distributed() else "none"
        say(
            f"[{job.tag}] {world} worker(s) on {nodes} node(s), {device}, process group {backend}, "
            f"{steps} steps of {batch} per worker per epoch ({train.global_batch} per step)"
        )

    preemption = Preemption(session, train.preemption_check_steps, job.tag)
    with node_metrics(job, session, resumed=state is not None):
        for epoch in range(start_epoch, train.epochs):
            if checkpoint is None:
                fail_if_planned("train.epoch", job.fail_at_epoch, epoch)
            seed_stream(job.seed, rank, epoch, skip)
            started = time.perf_counter()
            set_lr(optimizer, lr_at(epoch, train.epochs, train.lr, train.lr_schedule))
            batches = train_batches(
                job.train_urls,
                steps=steps,
                batch_size=batch,
                rank=rank,
                world_size=world,
                seed=job.seed,
                epoch=epoch,
                shuffle_buffer=train.shuffle_buffer,
                cache=job.cache,
                label_fraction=job.label_fraction,
            )

            def checkpoint_if_preempted(done: int, epoch=epoch, first=step, skip=skip) -> None:
                """After `done` more steps of this epoch: on the first notice of a reclaimed node, a checkpoint."""
                if preemption.noticed(done):
                    at = {"epoch": epoch - 1, "step": first + done, "steps_done": skip + done}
                    metrics = {"epoch": epoch + 1, "steps_done": skip + done}  # no epoch's row: not in the history
                    report(session, metrics, unwrap(model), optimizer, at, history, adversary)
                    if rank == 0:
                        say(f"[{job.tag}] checkpointed at step {skip + done} of epoch {epoch + 1}")

            row = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "workers": world,
                **train_epoch(
                    model,
                    optimizer,
                    itertools.islice(batches, skip, None),
                    device,
                    train.grad_clip,
                    adversary,
                    first_step=step,
                    loss_scale=batch * world / train.global_batch,
                    after_step=checkpoint_if_preempted,
                ),
            }
            step, skip = step + steps - skip, 0
            row["train_time_s"] = time.perf_counter() - started  # optimisation only, before validation
            row |= validate(unwrap(model), job.val_urls, train.batch_size, rank, world, device, job.cache)
            row["epoch_time_s"] = time.perf_counter() - started
            row["replicas_in_sync"] = float(replicas_identical(model))
            history.append(row)
            if rank == 0:
                say(format_epoch(job.tag, row, train.epochs))
                if not row["replicas_in_sync"]:
                    say(f"[{job.tag}] warning: the workers' weights differ after epoch {epoch + 1}")
            report(session, row, unwrap(model), optimizer, {"epoch": epoch, "step": step}, history, adversary)
            if rank == 0 and job.run and job.log_epochs and epoch + 1 not in logged:  # after the checkpoint
                log_epoch(job.run, job.tag, row)


def rank_batch(global_batch: int, rank: int, world: int) -> int:
    """This rank's share of the global batch B: ⌊B / world⌋, one more on the first B mod world ranks."""
    return global_batch // world + (rank < global_batch % world)


def seed_stream(seed: int, rank: int, epoch: int, skip: int = 0) -> None:
    """Seed torch's global generator for one epoch of one rank from (seed, rank, epoch), or (seed, rank, epoch,
    skip) for the rest of an epoch resumed after its first `skip` steps (a preemption's checkpoint).

    The weights start the same on every rank (`torch.manual_seed(seed)` before the model is built); the noise drawn
    after that (the VAE's ε, dynamic binarisation, masking noise, dropout, prior samples) differs between ranks, so
    the global batch holds as many independent draws as samples, and a resumed epoch draws what it would have
    drawn without the interruption. (Shard order and shuffles are seeded by (seed, epoch, rank) in the loader.)
    """
    entropy = [seed, rank, epoch, skip] if skip else [seed, rank, epoch]
    torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def prepare(session: Session, model: nn.Module, adversary: Adversary | None) -> nn.Module:
    """The session's model (DDP-wrapped under DDP). An adversarial family's critic gets a DDP wrapper of its own:
    DDP all-reduces the parameters that require grad when it wraps a module, so D is frozen while the whole model
    is wrapped, and D's gradients are all-reduced in D's own backward pass."""
    if adversary is None:
        return session.prepare_model(model)
    with frozen(model.discriminator):
        model = session.prepare_model(model)
    adversary.critic = session.prepare_model(unwrap(model).discriminator)
    return model


@dataclass
class Adversary:
    """The critic of an `Adversarial` family: its own optimizer (Adam over the model's critic groups) and its own
    DDP wrapper (`critic`), stepped after every generator step once the family's schedule turns it on."""

    model: Adversarial
    critic: nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def of(cls, model: nn.Module) -> Adversary | None:
        if not isinstance(model, Adversarial):
            return None
        return cls(model, model.discriminator, torch.optim.Adam(model.critic_optimizer_groups()))

    def step(self, x: torch.Tensor, fakes: torch.Tensor, steps: int, loss_scale: float = 1.0):
        """One critic step on real x and the (detached) generated images, once `steps` generator steps are done
        (`loss_scale`: as in `train_epoch`)."""
        if not self.model.critic_active(steps):
            return None
        out = self.model.critic_losses(x, fakes.detach(), self.critic)
        self.optimizer.zero_grad(set_to_none=True)
        (out.total if loss_scale == 1 else out.total * loss_scale).backward()
        self.optimizer.step()
        return out


class Preemption:
    """Ray Train's notice that a node of this worker group is being reclaimed (a drained node: a spot instance's
    termination notice, KubeRay's preStop hook), asked every `every` steps of an epoch. Every rank asks at the same
    steps (each runs exactly `steps_per_epoch` steps) and gets rank 0's answer. The first notice is acted on once:
    the loop saves a checkpoint and trains on, and when the node goes Ray restarts the group from that step."""

    def __init__(self, session: Session, every: int, tag: str):
        self.session, self.every, self.tag = session, every, tag
        self.acted = False

    def noticed(self, done: int) -> bool:
        """True once: the first time a notice is in at a check after `done` steps of the epoch."""
        if self.acted or not self.every or done % self.every:
            return False
        info = self.session.preemption_info()
        if info is None:
            return False
        self.acted = True
        if self.session.rank == 0:
            say(
                f"[{self.tag}] node(s) {', '.join(info.preempted_node_ids)} reclaimed (ranks {info.preempted_ranks}):"
                " checkpointing mid-epoch"
            )
        return True


def lr_at(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """The learning rate of epoch `epoch` (0-based): constant, or cosine  lr·(1 + cos(π·epoch/epochs))/2.
    A function of the epoch alone, so a resumed run continues the same schedule."""
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return lr


def resume_state(checkpoint, tag: str | None) -> dict | None:
    """The state in Ray's last checkpoint; if that file is unreadable (corrupt, cut short), the newest readable
    checkpoint before it in the run's folder, with a warning (`tag`: the rank that prints). Every rank reads the
    same folders in the same order, so all resume from the same epoch. None: nothing readable, start afresh."""
    try:
        with checkpoint.as_directory() as d:
            return load_state(Path(d) / CHECKPOINT_FILE)
    except LatentzooError as err:
        warning = f"warning: the last checkpoint is unusable ({err})"
    run_path, _, latest = str(checkpoint.path).rstrip("/").rpartition("/")
    for folder, state in readable_checkpoints(checkpoint.filesystem, run_path, CHECKPOINT_FILE, before=latest):
        if tag:
            say(f"[{tag}] {warning}; resuming from the previous one, {folder}")
        return state
    if tag:
        say(f"[{tag}] {warning}; no earlier checkpoint is readable: training from the start")
    return None


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group at `lr`, times the group's own "lr_scale" where the model gives one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def node_metrics(job: TrainJob, session: Session, resumed: bool):
    """This node's system metrics into the run while the epochs run, from one worker per node (see Session)."""
    if job.run and session.node_rank is not None:
        return job.run.system_metrics(f"node{session.node_rank}", resume=resumed)
    return contextlib.nullcontext()


def log_epoch(run: TrackedRun, tag: str, row: dict) -> None:
    """One epoch's row to MLflow at step = its epoch; a tracking failure is reported, never the end of the
    training."""
    try:
        run.log_metrics(row, step=row["epoch"])
    except Exception as err:  # an unreachable server must not cost the run its checkpoints
        say(f"[{tag}] warning: MLflow logging of epoch {row['epoch']} failed ({type(err).__name__}: {err})")


class EpochLogger(ray.train.UserCallback):
    """Logs each epoch's row to MLflow from Ray Train's controller, right after the controller has registered the
    epoch's checkpoint: the run holds exactly the epochs the checkpoints keep. (Logged from rank 0, an epoch the
    controller never took, e.g. one cut off by an elastic resize, would stay in MLflow beside its retrained twin.)"""

    def __init__(self, run: TrackedRun, tag: str):
        self.run, self.tag = run, tag

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        # rank 0 attaches a checkpoint to every epoch's report; a preemption's mid-epoch one has no epoch's row
        if checkpoint is not None and "steps_done" not in metrics[0]:
            log_epoch(self.run, self.tag, metrics[0])


def log_missing_epochs(job: TrainJob, history: list[dict]) -> set[int]:
    """On resume: log the checkpointed epochs MLflow has not seen (a worker died between checkpoint and log), and
    return every epoch the run holds. A stopped attempt's workers may have trained and logged an epoch or two
    past the checkpoint Ray resumes from (they die after the driver); those are not logged again (the figures
    kept are the stopped attempt's, which the per-epoch seeding makes the retrained epoch's too)."""
    try:
        job.run.log_missing_epochs(history)
        return job.run.logged_epochs()
    except Exception as err:
        say(f"[{job.tag}] warning: could not bring the MLflow run up to date ({type(err).__name__}: {err})")
        return set()


def count_nodes() -> int:
    """How many Ray nodes the workers run on (one all-gather of the node ids), 1 outside Ray or without DDP."""
    if not (ray.is_initialized() and is_distributed()):
        return 1
    node = ray.get_runtime_context().get_node_id()
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def say(line: str) -> None:
    """One progress line to the driver's console (Ray Train V2's patched `print` would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_epoch(
    model,
    optimizer,
    batches,
    device,
    grad_clip,
    adversary: Adversary | None = None,
    first_step: int = 0,
    loss_scale: float = 1.0,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One epoch of optimisation, its first batch the run's optimizer step `first_step`; returns global (all-rank)
    means of the loss terms and model metrics, and the codebook usage over the epoch for families with a codebook.
    With an `adversary`, each generator step is followed by a critic step (`train_disc_*` figures).

    DDP averages the ranks' gradients; with per-rank batches n_r of a global batch B, the gradient of the mean
    over all B images is (1/world) Σ_r (n_r·world/B) ∇mean_r, so each rank's loss is scaled by
    `loss_scale` = n_r·world/B (1 when B divides evenly). `after_step(n)` runs after the epoch's n-th step."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    codes = code_counter(model, device)
    count = steps = 0
    data_wait = 0.0  # seconds spent waiting for the next batch (reading and decoding shards)
    batches = iter(batches)
    while True:
        waited = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        data_wait += time.perf_counter() - waited
        x = x.to(device, non_blocking=True)
        out = model(x, step=first_step + steps, labels=y.to(device))
        loss = out.total if loss_scale == 1 else out.total * loss_scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        accumulate(sums, "train", out, len(x))
        fakes = out.recon if out.fakes is None else out.fakes
        disc_out = adversary.step(x, fakes, steps=first_step + steps + 1, loss_scale=loss_scale) if adversary else None
        if disc_out:
            accumulate(sums, "train_disc", disc_out, len(x))
        if codes:
            codes.add(out.codes)
        count += len(x)
        steps += 1
        if after_step:
            after_step(steps)
    stats = global_means(sums, count, device) | code_usage(codes, "train")
    stats["steps_min"], stats["steps_max"] = global_min_max(steps, device)
    stats["data_wait_s"] = data_wait  # rank 0's
    return stats


@torch.no_grad()
def validate(model, urls, batch_size, rank, world, device, cache: NodeCache | None = None) -> dict[str, float]:
    """One pass over this rank's val shards with the plain module (no DDP collectives), sums all-reduced."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(12345 + rank)
    sums: dict[str, float] = defaultdict(float)
    codes = code_counter(model, device)
    count = 0
    for x, y in eval_batches(urls, batch_size=batch_size, rank=rank, world_size=world, cache=cache):
        x = x.to(device)
        out = model(x, generator=generator, labels=y.to(device))
        accumulate(sums, "val", out, len(x))
        if codes:
            codes.add(out.codes)
        count += len(x)
    return global_means(sums, count, device) | code_usage(codes, "val")


def code_counter(model: nn.Module, device) -> CodeCounter | None:
    """A histogram for the codes of a `Coded` family (decided by the model, so every rank agrees)."""
    model = unwrap(model)
    return CodeCounter(model.codebook_size, device) if isinstance(model, Coded) else None


def code_usage(codes: CodeCounter | None, prefix: str) -> dict[str, float]:
    """`<prefix>_utilisation`, `_perplexity`, `_dead_codes` over all ranks (a collective), or nothing."""
    return {f"{prefix}_{k}": v for k, v in codes.usage(all_ranks=True).items()} if codes else {}


def replicas_identical(model: nn.Module) -> bool:
    """True when every rank holds bit-identical weights and buffers: a sha256 of the state dict per rank,
    all-gathered (one small collective). DDP keeps parameters equal; this also covers what DDP does not,
    such as EMA codebooks and restarted codes."""
    if not is_distributed():
        return True
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def accumulate(sums: dict[str, float], prefix: str, out, n: int) -> None:
    """Add a batch's objective, weighted loss terms (`<prefix>_loss_<term>`) and metrics, times its size."""
    sums[f"{prefix}_loss"] += out.total.item() * n
    for name, value in out.losses.items():
        sums[f"{prefix}_loss_{name}"] += value.item() * n
    for name, value in out.metrics.items():
        sums[f"{prefix}_{name}"] += value.item() * n


def global_means(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Sample-weighted means over all ranks (one all-reduce of [sums..., count]).

    The key set is agreed first: a rank without any sample of a small split has no keys, and an all-reduce of
    tensors of different lengths aborts gloo.
    """
    keys = sorted(sums)
    distributed = is_distributed()
    if distributed:
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, keys)
        keys = sorted(set().union(*gathered))
    values = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(values)
    total = max(values[-1].item(), 1.0)
    return {k: values[i].item() / total for i, k in enumerate(keys)}


def global_min_max(value: int, device) -> tuple[int, int]:
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]), int(-t[1])


def report(session: Session, row, model, optimizer, at: dict, history, adversary: Adversary | None = None) -> None:
    """Every rank calls report (it is a barrier); only rank 0 attaches the checkpoint. `at`: where training stands,
    {"epoch": the last whole epoch (0-based), "step": optimizer steps so far}, and "steps_done" (steps of the next
    epoch taken) in a preemption's mid-epoch checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if session.rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **at, "history": history}
            if adversary:
                state["disc_optimizer"] = adversary.optimizer.state_dict()
            save_state(Path(d) / CHECKPOINT_FILE, state)
            checkpoint = session.checkpoint_cls.from_directory(d)
        session.report(row, checkpoint=checkpoint)


def format_epoch(model_name: str, row: dict, epochs: int) -> str:
    shown = {
        k: v
        for k, v in row.items()
        if k
        in (
            "train_loss",
            "val_loss",
            "val_neg_elbo",
            "val_mse",
            "val_utilisation",
            "val_perplexity",
            "val_recon_mse",
            "val_accuracy",
        )
    }
    parts = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
    return f"[{model_name}] epoch {row['epoch']}/{epochs}  {parts}  {row['epoch_time_s']:.1f}s"
