"""DVC stage `report`: one cross-model report (reports/report.md), also logged to MLflow."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.report import report_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--eval-metrics", type=Path, required=True, help="folder of evaluate-stage metrics")
    ap.add_argument("--train-metrics", type=Path, required=True, help="folder of train-stage metrics")
    ap.add_argument("--plots", type=Path, required=True, help="folder of per-model evaluate plots")
    ap.add_argument("--pretrain-metrics", type=Path, default=None, help="the pretrain stage's metrics (stacked AE)")
    ap.add_argument("--finetune-metrics", type=Path, default=None, help="the finetune stage's metrics (stacked AE)")
    ap.add_argument("--curves", type=Path, default=None, help="folder of train-stage per-epoch CSVs (plots/train)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    report_stage(
        load_params(args.params),
        args.eval_metrics,
        args.train_metrics,
        args.plots,
        args.out,
        pretrain_metrics=args.pretrain_metrics,
        finetune_metrics=args.finetune_metrics,
        curves_dir=args.curves,
    )


if __name__ == "__main__":
    main()
