"""The report stage: one cross-model report, also logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from latentzoo.config import Params
from latentzoo.evaluation.report import build_report
from latentzoo.tracking.runs import TrackedRun

MLFLOW_UI = (
    "Browse the runs: `.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
    "then open http://127.0.0.1:5000/#/experiments (pick an experiment, then its Runs tab)."
)


def read_stacked(pretrain_metrics: Path | None, finetune_metrics: Path | None) -> dict:
    """The stacked autoencoder's pretrain and finetune metrics, where those stages ran."""
    found = {}
    for key, path in (("pretrain", pretrain_metrics), ("finetune", finetune_metrics)):
        if path is not None and Path(path).exists():
            found[key] = json.loads(Path(path).read_text())
    return found


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
        mlflow_hint=MLFLOW_UI,
        stacked=read_stacked(pretrain_metrics, finetune_metrics),
        curves_dir=curves_dir,
    )
    if params.tracking.enabled:
        experiment = f"{params.tracking.experiment_prefix}-report"
        run = TrackedRun.start(None, experiment, "report", {"latentzoo.stage": "report"})
        for name in ("report.md", "report.html", "metrics.json", "images"):
            if (Path(out_dir) / name).exists():
                run.log_artifact(Path(out_dir) / name)
        run.finish()
    print(f"report: {report}")
    return report
