"""DVC stage `train@<model>`: Ray Train DDP over the shards; final weights, metrics and per-epoch plots."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.train import train_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--model", required=True, help="a name from params.yaml `models`")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="model directory (model.pt, mlflow_run.json)")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--tuned", type=Path, default=None, help="the tune stage's best weights (tune/<model>/best.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)  # validated before Ray starts
    train_stage(params, args.model, args.shards, args.out, args.metrics, args.plots, tuned=args.tuned)


if __name__ == "__main__":
    main()
