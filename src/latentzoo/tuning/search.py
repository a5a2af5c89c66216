"""The tune stage: Ray Tune searches a model's loss weights; the best ones feed that model's train stage.

Each trial is one training with the train stage's loop and sampled weights, for `tune.epochs` epochs, in one
process (see `run_trial` for why not a TorchTrainer per trial). ASHA (Li et al., arXiv 1810.05934) stops the
trials whose objective lags at each rung, a model-based searcher (Optuna's TPE) proposes the next weights, and
the objective is the model family's validation metric (`tune_metric` of its config: -ELBO for the VAE,
reconstruction MSE for the VQ families), so trials with different loss weights are compared on one scale.

MLflow: one parent run per search, one nested run per trial (params, per-epoch curves), the best trial tagged.
An interrupted search resumes with `Tuner.restore`: the experiment path is a hash of everything that defines
the search, so running the stage again finds it; an errored trial is recorded and the search goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from latentzoo.atomic import atomic_write_text
from latentzoo.config import Params, validate_params
from latentzoo.errors import TrainingError
from latentzoo.faults import fail_if_planned, planned
from latentzoo.storage import RunFolder, storage_location
from latentzoo.tracking import mlflow_runs
from latentzoo.training.loop import run_loop, tune_session
from latentzoo.training.trainer import DONE_MARKER, RUN_RECORD, TrainingData, connect_ray, run_name, training_data

MODE = "min"


# ---------------------------------------------------------------- what is searched


def search_space(params, model_name: str) -> dict:
    """{loss weight: ray.tune domain} from `tune.space.<model>` (empty: nothing to search)."""
    from ray import tune

    return {
        key: (tune.loguniform if bounds.log else tune.uniform)(bounds.low, bounds.high)
        for key, bounds in params.tune.space.get(model_name, {}).items()
    }


def with_weights(params, model_name: str, weights: dict[str, float]):
    """Params with `weights` set in the model's section (validated again, so a bad weight is a clear error)."""

    raw = params.model_dump()
    raw[model_name] = {**raw[model_name], **weights}
    return validate_params(raw, source="tuned params")


def trial_params(params, model_name: str, weights: dict[str, float]):
    """A trial's params: the sampled weights, `tune.epochs` epochs, one process of `tune.cpus_per_trial` threads."""
    tuned = with_weights(params, model_name, weights)
    train = tuned.train.model_copy(
        update={"epochs": params.tune.epochs, "num_workers": 1, "torch_threads": params.tune.cpus_per_trial}
    )
    return tuned.model_copy(update={"train": train})


def apply_tuned(params, model_name: str, tuned_file: Path):
    """The train stage's params: params.yaml with the weights the tune stage found (`tune/<model>/best.yaml`)."""
    tuned = yaml.safe_load(Path(tuned_file).read_text()) or {}
    if tuned.get("model") != model_name:
        raise TrainingError(f"{tuned_file}: holds weights for model {tuned.get('model')!r}, not {model_name!r}")
    return with_weights(params, model_name, tuned.get("weights") or {})


def search_name(params, model_name: str, manifest_sha: str) -> str:
    """Deterministic experiment name: same search → same name → `Tuner.restore`; any change → a fresh search."""
    return run_name(model_name, params, manifest_sha, prefix="tune-")


# ---------------------------------------------------------------- one trial


def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: the train stage's loop (`run_loop`) with the sampled weights in `config`, run in
    the trial's own process with Tune's session (`ray.tune.report` / `get_checkpoint`) in place of Ray Train's.

    Ray recommends a TorchTrainer inside the function trainable for trials that need several DDP workers. On
    Ray 2.60 that leaks each trial's worker placement group whenever ASHA stops the trial (ray-project/ray#54305:
    the trial actor is killed before Train removes it, and Train's cleaner needs the dashboard's state API), and
    the leaked CPUs starve the following trials. A loss-weight search is made of many short single-process runs,
    so each trial is one process that Tune can stop and restore cleanly, with the same loop and checkpoints.
    """
    import ray.tune

    trial = ray.tune.get_context()
    trial_id, number = trial.get_trial_id(), trial_number(trial.get_trial_dir())
    params = trial_params(Params.model_validate(ctx["params"]), ctx["model"], config)
    run_id = open_trial_run(ctx, trial_id, number, config)
    job = TrainingData(**ctx["data"]).job(params, ctx["model"], ctx["mlflow_uri"], run_id)
    session = tune_session(params.train.use_gpu)
    reached = [0]  # the last epoch reported

    def report(metrics, checkpoint=None):
        reached[0] = metrics["epoch"]
        session.report(metrics, checkpoint=checkpoint)

    status = "FINISHED"
    try:
        fail_if_planned("tune.trial", ctx["fail_trial"], number)
        run_loop(job, replace(session, report=report))
    except SystemExit:  # Tune ends a trial it stops (ASHA, or its last epoch) with sys.exit inside report
        if reached[0] < params.train.epochs:
            status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if run_id:
            close_trial_run(ctx["mlflow_uri"], run_id, status)


def close_trial_run(uri: str, run_id: str, status: str) -> None:
    if status == "KILLED":
        mlflow_runs.set_tags(uri, run_id, {"latentzoo.stopped_early": "true"})
    mlflow_runs.end_run(uri, run_id, status=status)


def trial_number(trial_dir: str) -> int:
    """The trial's number in its search (1, 2, ...), from Tune's trial folder 'run_trial_<id>_<number>_<config>'."""
    match = re.match(r"run_trial_[0-9a-f_]+?_(\d+)_", Path(trial_dir).name)
    return int(match.group(1)) if match else 0


def open_trial_run(ctx: dict, trial_id: str, number: int, weights: dict) -> str | None:
    """A nested MLflow run under the search's run, holding the trial's weights (the loop logs its curves)."""
    if not ctx["parent_run_id"]:
        return None
    uri = ctx["mlflow_uri"]
    tags = {
        "mlflow.parentRunId": ctx["parent_run_id"],
        "latentzoo.stage": "tune-trial",
        "latentzoo.model": ctx["model"],
        "latentzoo.trial_id": trial_id,
    }
    run_id = mlflow_runs.start_run(uri, ctx["experiment"], f"trial-{number}", tags, Path(ctx["root"]))
    mlflow_runs.log_params(uri, run_id, {ctx["model"]: weights})
    return run_id


# ---------------------------------------------------------------- the search


def tune_model(params, model_name: str, shard_dir: Path, out_file: Path, root: Path | None = None) -> dict:
    """Search the loss weights of `model_name`; write the best to `out_file` (YAML) and return that record."""
    root = Path(root or Path.cwd()).resolve()
    space = search_space(params, model_name)
    if not params.tune.enabled or not space:
        why = "tune.enabled is false" if not params.tune.enabled else f"tune.space has no entry for {model_name}"
        return write_best(out_file, {"model": model_name, "searched": False, "reason": why, "weights": {}})

    data = training_data(params, model_name, shard_dir)
    name = search_name(params, model_name, data.manifest_sha)
    folder = RunFolder(storage_location(params.ray.storage_path, root), name)
    if folder.exists(DONE_MARKER):  # a finished search with identical inputs (outputs deleted): search again
        folder.remove()
    metric = params.model_config_for(model_name).tune_metric
    connect_ray(params.ray.num_cpus, params.ray.log_level)
    # Tune's newer console engine prints a configuration box even at verbose=0; the classic reporter is silent
    # there, and our loop prints one line per trial epoch.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    uri, parent = open_search_run(params, model_name, name, folder, root)
    experiment = f"{params.tracking.experiment_prefix}-{model_name}"
    ctx = {
        "params": params.model_dump(),
        "model": model_name,
        "data": asdict(data),
        "mlflow_uri": uri,
        "parent_run_id": parent,
        "root": str(root),
        "experiment": experiment,
        "fail_trial": planned("tune.trial"),
    }
    results = make_tuner(params, space, metric, ctx, folder).fit()

    best_record = summarise(results, model_name, metric, params)
    if parent:
        close_search_run(uri, parent, best_record)
    folder.write_text(DONE_MARKER, "done\n")
    return write_best(out_file, best_record)


def concurrent_trials(params) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs hold."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return params.tune.max_concurrent_trials or max(1, cpus // params.tune.cpus_per_trial)


def make_tuner(params, space: dict, metric: str, ctx: dict, folder: RunFolder):
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


def summarise(results, model_name: str, metric: str, params) -> dict:
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


def write_best(out_file: Path, record: dict) -> dict:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, yaml.safe_dump(record, sort_keys=False))
    return record


# ---------------------------------------------------------------- MLflow parent run


def open_search_run(params, model_name, name, folder: RunFolder, root: Path) -> tuple[str | None, str | None]:
    """The search's parent run (reopened when an interrupted search is restored)."""
    if not params.tracking.enabled:
        return None, None
    uri = mlflow_runs.tracking_uri(root)
    run_id = mlflow_runs.reopen_saved_run(uri, folder.read_text(RUN_RECORD))
    if run_id:
        return uri, run_id
    tags = {
        "latentzoo.stage": "tune",
        "latentzoo.model": model_name,
        "latentzoo.ray_run": name,
        "mlflow.source.git.commit": mlflow_runs.git_commit(root),
    }
    run_id = mlflow_runs.start_run(
        uri, f"{params.tracking.experiment_prefix}-{model_name}", f"tune-{model_name}", tags, root
    )
    mlflow_runs.log_params(
        uri, run_id, {"tune": params.tune.model_dump(exclude={"space"}), "space": params.tune.space.get(model_name, {})}
    )
    folder.write_text(RUN_RECORD, json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return uri, run_id


def close_search_run(uri: str, parent: str, record: dict) -> None:
    """Best weights and objective on the parent; the best trial tagged; trials ASHA stopped closed as KILLED."""
    mlflow_runs.log_params(uri, parent, {"best": record["weights"]})
    value = record["best_value"]
    mlflow_runs.log_metrics(uri, parent, {f"best_{record['metric']}": value} if math.isfinite(value) else {})
    for run_id, status, tags in mlflow_runs.child_runs(uri, parent):
        if tags.get("latentzoo.trial_id") == record["best_trial"]:
            mlflow_runs.set_tags(uri, run_id, {"latentzoo.best_trial": "true"})
            mlflow_runs.set_tags(uri, parent, {"latentzoo.best_trial_run": run_id})
        if status == "RUNNING":  # its process ended before it could close the run
            close_trial_run(uri, run_id, "KILLED")
    mlflow_runs.end_run(uri, parent)
