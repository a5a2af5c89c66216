"""The report stage: one cross-model report, also logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from latentzoo.config import Params
from latentzoo.evaluation.report import build_report
from latentzoo.tracking.runs import RUN_LINK, TrackedRun

COMPARE = "compare"  # the experiment <prefix>-compare: a run per family, test metrics side by side
MLFLOW_UI = (
    "Browse the runs: `make mlflow-ui`, then open http://127.0.0.1:5000/#/experiments: `{compare}` holds a "
    "run per family with its test metrics (select them all, then Compare); each family's experiment holds its "
    "training runs, with system metrics, the shards they read and the registered model."
)


def read_stacked(pretrain_metrics: Path | None, finetune_metrics: Path | None) -> dict:
    """The stacked autoencoder's pretrain and finetune metrics, where those stages ran."""
    found = {}
    for key, path in (("pretrain", pretrain_metrics), ("finetune", finetune_metrics)):
        if path is not None and Path(path).exists():
            found[key] = json.loads(Path(path).read_text())
    return found


def log_comparison(experiment: str, eval_dir: Path, plots_dir: Path, models: list[str], report: TrackedRun) -> None:
    """One run per family in one experiment, with that family's test metrics: MLflow's compare view shows every
    family side by side (each family's own experiment holds its training runs). Each run is tagged with the
    report run it belongs to and links to the family's training run."""
    for name in models:
        path = eval_dir / f"{name}.json"
        if not path.exists():
            continue
        tags = {"latentzoo.stage": "compare", "latentzoo.model": name, "latentzoo.report_run": report.run_id}
        if link := run_link(plots_dir, name):
            tags["latentzoo.training_run"] = link["run_id"]
        run = TrackedRun.start(None, experiment, name, tags)
        run.log_params({"model": name})
        run.log_metrics(json.loads(path.read_text()))
        run.finish()


def run_link(plots_dir: Path, model: str) -> dict | None:
    """{run_id, url} of `model`'s training run, as its evaluate stage recorded it beside its figures, or None."""
    path = plots_dir / model / RUN_LINK
    return json.loads(path.read_text()) if path.exists() else None


def run_links(models: list[str], plots_dir: Path) -> dict[str, str]:
    """{model: URL of its training run in the MLflow UI}."""
    return {name: link["url"] for name in models if (link := run_link(plots_dir, name))}


def report_stage(
    params: Params,
    eval_dir: Path,
    train_dir: Path,
    plots_dir: Path,
    out_dir: Path,
    pretrain_metrics: Path | None = None,
    finetune_metrics: Path | None = None,
    curves_dir: Path | None = None,
) -> Path:
    report = build_report(
        list(params.models),
        Path(eval_dir),
        Path(train_dir),
        Path(plots_dir),
        Path(out_dir),
        mlflow_hint=MLFLOW_UI.format(compare=f"{params.tracking.experiment_prefix}-{COMPARE}"),
        stacked=read_stacked(pretrain_metrics, finetune_metrics),
        curves_dir=curves_dir,
        links=run_links(list(params.models), Path(plots_dir)),
    )
    if params.tracking.enabled:
        prefix = params.tracking.experiment_prefix
        run = TrackedRun.start(None, f"{prefix}-report", "report", {"latentzoo.stage": "report"})
        for name in ("report.md", "report.html", "metrics.json", "images"):
            if (Path(out_dir) / name).exists():
                run.log_artifact(Path(out_dir) / name)
        run.finish()
        log_comparison(f"{prefix}-{COMPARE}", Path(eval_dir), Path(plots_dir), list(params.models), run)
    print(f"report: {report}")
    return report
