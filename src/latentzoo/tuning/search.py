"""The tune stage: Ray Tune searches a model's loss weights; the best ones feed that model's train stage.

Each trial is one training with the train stage's loop and sampled weights, for `tune.epochs` epochs, in one
process (see `run_trial` for why not a TorchTrainer per trial). ASHA (Li et al., arXiv 1810.05934) stops the
trials whose objective lags at each rung, a model-based searcher (Optuna's TPE) proposes the next weights, and
the objective is the model family's validation metric (`tune_metric` of its config: -ELBO for the VAE,
reconstruction MSE for the VQ families), so trials with different loss weights are compared on one scale.

MLflow: one parent run per search, one nested run per trial (params, per-epoch curves), the best trial tagged.
An interrupted search resumes with `Tuner.restore`: the experiment path is a hash of everything that defines
the search, so running the stage again finds it; an errored trial is recorded and the search goes on. Ctrl-C or
SIGTERM stops the search as Tune stops it on Ctrl-C (state saved) and the stage as an interrupted one: exit 130 /
143, no best weights written, the parent run KILLED until the next attempt resumes it.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar
from unittest.mock import patch

import yaml

from latentzoo.atomic import atomic_write_text
from latentzoo.checkpoint import CHECKPOINT_FILE, load_state
from latentzoo.config import Params
from latentzoo.errors import Terminated, TrainingError
from latentzoo.faults import fail_if_planned, planned
from latentzoo.storage import RunFolder, project_root, storage_location
from latentzoo.tracking.runs import TrackedRun, logging_failed
from latentzoo.training.cluster import check_ray_address, clear_node_caches, connect_ray
from latentzoo.training.job import TrainJob, training_data
from latentzoo.training.loop import run_loop, say, tune_session
from latentzoo.training.trainer import DONE_MARKER, run_name
from latentzoo.tuning.tuned import section_with_weights, with_weights

MODE = "min"
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"  # read by Tune when a search starts: 1 leaves SIGINT to us
T = TypeVar("T")


# ---------------------------------------------------------------- what is searched


def search_space(params: Params, model_name: str) -> dict:
    """{loss weight: ray.tune domain} from `tune.space.<model>` (empty: nothing to search)."""
    from ray import tune

    return {
        key: (tune.loguniform if bounds.log else tune.uniform)(bounds.low, bounds.high)
        for key, bounds in params.tune.space_for(model_name).items()
    }


def trial_params(params: Params, model_name: str, weights: dict[str, float]) -> Params:
    """A trial's params: the sampled weights, `tune.epochs` epochs, one process of `tune.cpus_per_trial` threads."""
    return with_weights(params, model_name, weights).updated(
        **{
            "train.epochs": params.tune.epochs,
            "train.num_workers": 1,
            "train.torch_threads": params.tune.cpus_per_trial,
        }
    )


def search_name(params: Params, model_name: str, manifest_sha: str) -> str:
    """Deterministic experiment name: same search → same name → `Tuner.restore`; any change → a fresh search."""
    return run_name(model_name, params, manifest_sha, prefix="tune-")


# ---------------------------------------------------------------- one trial


def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: the train stage's loop (`run_loop`) on the search's job (`ctx["job"]`) with the
    sampled weights in `config`, run in the trial's own process with Tune's session (`ray.tune.report` /
    `get_checkpoint`) in place of Ray Train's.

    Ray recommends a TorchTrainer inside the function trainable for trials that need several DDP workers. On
    Ray 2.60 that leaks each trial's worker placement group whenever ASHA stops the trial (ray-project/ray#54305:
    the trial actor is killed before Train removes it, and Train's cleaner needs the dashboard's state API), and
    the leaked CPUs starve the following trials. A loss-weight search is made of many short single-process runs,
    so each trial is one process that Tune can stop and restore cleanly, with the same loop and checkpoints.
    """
    import ray.tune

    trial = ray.tune.get_context()
    trial_id, number = trial.get_trial_id(), trial_number(trial.get_trial_dir())
    job: TrainJob = ctx["job"]
    run = tracked(lambda: open_trial_run(ctx, trial_id, number, config), f"[{job.tag}] trial {number}")
    job = replace(job, model_config=section_with_weights(job.model_config, config), run=run)
    session = tune_session(job.train.use_gpu)
    reached = [0]  # the last epoch reported

    def report(metrics, checkpoint=None):
        reached[0] = metrics["epoch"]
        session.report(metrics, checkpoint=checkpoint)

    status = "FINISHED"
    try:
        fail_if_planned("tune.trial", ctx["fail_trial"], number)
        run_loop(job, replace(session, report=report))
    except SystemExit:  # Tune ends a trial it stops (ASHA, or its last epoch) with sys.exit inside report
        if reached[0] < job.train.epochs:
            status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if run:
            tracked(lambda: close_trial_run(run, status), f"[{job.tag}] trial {number}")


def tracked(log: Callable[[], T], what: str) -> T | None:
    """`log()`, or a warning and None when MLflow fails: a lost server never stops the search. The search's run
    logs what its trials missed when it closes (`log_missed_trials`)."""
    try:
        return log()
    except Exception as err:
        say(f"{what}: warning: MLflow logging failed ({type(err).__name__}: {str(err)[:200]}); the search goes on")
        return None


def close_trial_run(run: TrackedRun, status: str) -> None:
    if status == "KILLED":
        run.set_tags({"latentzoo.stopped_early": "true"})
    run.finish(status)


def trial_number(trial_dir: str) -> int:
    """The trial's number in its search (1, 2, ...), from Tune's trial folder 'run_trial_<id>_<number>_<config>'."""
    match = re.match(r"run_trial_[0-9a-f_]+?_(\d+)_", Path(trial_dir).name)
    return int(match.group(1)) if match else 0


def open_trial_run(ctx: dict, trial_id: str, number: int, weights: dict) -> TrackedRun | None:
    """A nested MLflow run under the search's run, holding the trial's weights (the loop logs its curves)."""
    parent: TrackedRun | None = ctx["parent"]
    if not parent:
        return None
    tags = {"latentzoo.stage": "tune-trial", "latentzoo.model": ctx["model"], "latentzoo.trial_id": trial_id}
    run = parent.child(ctx["experiment"], f"trial-{number}", tags, Path(ctx["root"]))
    run.log_params({ctx["model"]: weights})
    return run


# ---------------------------------------------------------------- the search


def tune_model(params: Params, model_name: str, shard_dir: Path, out_file: Path, root: Path | None = None) -> dict:
    """Search the loss weights of `model_name`; write the best to `out_file` (YAML) and return that record."""
    root = project_root(root)
    space = search_space(params, model_name)
    if not params.tune.enabled or not space:
        why = "tune.enabled is false" if not params.tune.enabled else f"tune.space has no entry for {model_name}"
        return write_best(out_file, {"model": model_name, "searched": False, "reason": why, "weights": {}})

    trial = trial_params(params, model_name, {})  # what every trial trains with, but for its sampled weights
    data = training_data(trial, model_name, shard_dir)  # checked for one worker, as a trial runs
    check_ray_address()  # before an MLflow run is opened
    name = search_name(params, model_name, data.manifest_sha)
    folder = RunFolder(storage_location(params.ray.storage_path, root), name)
    if folder.exists(DONE_MARKER):  # a finished search with identical inputs (outputs deleted): search again
        folder.remove()
    metric = params.model_config_for(model_name).tune_metric
    connect_ray(params.ray.num_cpus, params.ray.log_level, params.ray.worker_start_timeout_s)
    # Tune's newer console engine prints a configuration box even at verbose=0; the classic reporter is silent
    # there, and our loop prints one line per trial epoch.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    parent = open_search_run(params, model_name, name, folder, root)
    experiment = f"{params.tracking.experiment_prefix}-{model_name}"
    ctx = {  # what a trial gets: the job of a trial without weights, and its MLflow parent
        "job": data.job(trial, model_name),
        "model": model_name,
        "parent": parent,
        "root": str(root),
        "experiment": experiment,
        "fail_trial": planned("tune.trial"),
    }
    with stop_on_signals() as received:
        try:
            results = make_tuner(params, space, metric, ctx, folder).fit()
        finally:
            clear_node_caches(data.cache)
    if received or unfinished(results, params.tune.num_samples):
        # Ctrl-C or SIGTERM came (Tune stopped the search, saved it and returned), or the search stopped short: the
        # stage is not done, even if every trial had ended by the time Tune looked.
        if parent:
            tracked(lambda: parent.finish("KILLED"), f"[{model_name}] search")
        raise Terminated() if signal.SIGTERM in received else KeyboardInterrupt()

    best_record = summarise(results, model_name, metric, params)
    if parent:
        finish_search_run(parent, best_record, results, ctx, params.tune.epochs)
    folder.write_text(DONE_MARKER, "done\n")
    return write_best(out_file, best_record)


@contextmanager
def stop_on_signals() -> Iterator[set[int]]:
    """While Tune runs, Ctrl-C (SIGINT) and SIGTERM (what `kill`, a stopped job and Kubernetes send) are passed on
    to Tune as SIGUSR1, on which Tune stops the trials, saves the search for `Tuner.restore` and returns; the set
    says which came. Tune's own Ctrl-C handler is off (TUNE_DISABLE_SIGINT_HANDLER): ours records the signal, so
    a Ctrl-C that lands as the last trial ends still stops the stage. A second Ctrl-C acts at once (the handler
    from before the search is back after the first), as in Tune. Before Tune has its SIGUSR1 handler in place, the
    signal ends the stage as usual; after the search, SIGINT, SIGTERM and SIGUSR1 have their handlers from before
    it again (Tune leaves its own in place, which would swallow a Ctrl-C while the stage writes its results)."""
    received: set[int] = set()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def pass_on(signum, frame):
        received.add(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, kept[signum])
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):  # Tune is not running (yet)
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        signal.raise_signal(signal.SIGUSR1)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    try:
        with patch.dict(os.environ, {TUNE_SIGINT_ENV: "1"}):
            yield received
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def unfinished(results, num_samples: int) -> bool:
    """Did the search stop before every trial ended (finished, stopped by ASHA, or errored)?"""
    return results.num_terminated + results.num_errors < num_samples


def concurrent_trials(params: Params) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs hold."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return params.tune.max_concurrent_trials or max(1, cpus // params.tune.cpus_per_trial)


def make_tuner(params: Params, space: dict, metric: str, ctx: dict, folder: RunFolder):
    """A fresh Tuner, or `Tuner.restore` of the interrupted search in `folder` (errored trials stay errored)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    resources = {"CPU": params.tune.cpus_per_trial, "GPU": 1 if params.train.use_gpu else 0}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    path = f"{folder.storage}/{folder.name}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_errored=False, restart_errored=False)
    cfg = params.tune
    searcher = None
    if cfg.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial on the console

        searcher = OptunaSearch(metric=metric, mode=MODE, seed=params.seed)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=MODE,
            search_alg=searcher,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=cfg.epochs,
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
            ),
            num_samples=cfg.num_samples,
            max_concurrent_trials=concurrent_trials(params),
        ),
        run_config=tune.RunConfig(
            name=folder.name,
            storage_path=folder.storage,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=0,
        ),
    )


def summarise(results, model_name: str, metric: str, params: Params) -> dict:
    """The best trial's weights and objective, and what happened to every trial."""
    finished = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    if not finished:
        errors = "; ".join(sorted({str(r.error).strip().splitlines()[-1] for r in results if r.error}))
        raise TrainingError(f"tune {model_name}: no trial finished ({len(results)} tried). {errors}")
    best = min(finished, key=lambda r: r.metrics[metric])
    epochs = [r.metrics.get("training_iteration", 0) for r in finished]
    return {
        "model": model_name,
        "searched": True,
        "metric": metric,
        "mode": MODE,
        "best_value": float(best.metrics[metric]),
        "weights": {k: float(v) for k, v in best.config.items()},
        "best_trial": best.metrics.get("trial_id"),
        "trials": {
            "total": len(results),
            "errored": results.num_errors,
            "stopped_early": sum(e < params.tune.epochs for e in epochs),
        },
        "experiment": str(results.experiment_path),
    }


def stopped_early(results, epochs: int) -> set[str]:
    """The ids of the trials ASHA stopped before `epochs` (errored trials excepted)."""
    return {
        r.metrics.get("trial_id")
        for r in results
        if r.error is None and r.metrics and r.metrics.get("training_iteration", 0) < epochs
    }


def write_best(out_file: Path, record: dict) -> dict:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, yaml.safe_dump(record, sort_keys=False))
    return record


# ---------------------------------------------------------------- MLflow parent run


def open_search_run(params: Params, model_name, name, folder: RunFolder, root: Path) -> TrackedRun | None:
    """The search's parent run (reopened when an interrupted search is restored)."""
    tags = {
        "latentzoo.stage": "tune",
        "latentzoo.model": model_name,
        "latentzoo.ray_run": name,
    }
    logged = {"tune": params.tune.model_dump(exclude={"space"}), "space": params.tune.space_for(model_name)}
    return TrackedRun.open(
        params.tracking, folder, family=model_name, name=f"tune-{model_name}", tags=tags, params=logged, root=root
    )


def finish_search_run(parent: TrackedRun, record: dict, results, ctx: dict, epochs: int) -> None:
    """The trials' runs MLflow missed, then the search's run closed. A server still down is a clear error after
    the search: it is saved, so the next attempt restores it (no trial runs again) and only logs."""
    try:
        missed = log_missed_trials(parent, results, ctx, stopped_early(results, epochs))
        if missed:
            say(f"[{ctx['job'].tag}] logged {missed} trial run(s) MLflow had missed")
        close_search_run(parent, record, stopped_early(results, epochs))
    except Exception as err:
        saved, rerun = "the search is saved", "it restores the search and only logs"
        raise logging_failed(f"tune {ctx['model']}", parent.uri, err, saved, rerun) from None


def log_missed_trials(parent: TrackedRun, results, ctx: dict, stopped: set[str]) -> int:
    """A nested run for each trial whose own run never reached MLflow (the server was down when it started), with
    its weights and every epoch of its last checkpoint; returns how many."""
    logged = {tags.get("latentzoo.trial_id") for _, _, tags in parent.children()}
    missed = [r for r in results if r.metrics.get("trial_id") not in logged]
    for result in missed:
        trial_id = result.metrics.get("trial_id")
        run = open_trial_run(ctx, trial_id, trial_number(result.path), result.config)
        if result.checkpoint:
            with result.checkpoint.as_directory() as d:
                run.log_missing_epochs(load_state(Path(d) / CHECKPOINT_FILE)["history"])
        close_trial_run(run, "FAILED" if result.error else "KILLED" if trial_id in stopped else "FINISHED")
    return len(missed)


def close_search_run(parent: TrackedRun, record: dict, stopped: set[str]) -> None:
    """Best weights and objective on the parent; the best trial tagged. A trial whose process ended before it closed
    its own run is closed here: KILLED if ASHA stopped it (`stopped`), else FINISHED."""
    parent.log_params({"best": record["weights"]})
    value = record["best_value"]
    parent.log_metrics({f"best_{record['metric']}": value} if math.isfinite(value) else {})
    for trial, status, tags in parent.children():
        if tags.get("latentzoo.trial_id") == record["best_trial"]:
            trial.set_tags({"latentzoo.best_trial": "true"})
            parent.set_tags({"latentzoo.best_trial_run": trial.run_id})
        if status == "RUNNING":  # its process ended before it could close the run
            close_trial_run(trial, "KILLED" if tags.get("latentzoo.trial_id") in stopped else "FINISHED")
    parent.finish()
