"""DVC stage `tune@<model>`: Ray Tune searches the model's loss weights; writes the best to tune/<model>/best.yaml."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.tune import tune_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--model", required=True, help="a name from params.yaml `models`")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the best weights (YAML), read by the train stage")
    args = ap.parse_args(argv)
    params = load_params(args.params)  # validated before Ray starts
    tune_stage(params, args.model, args.shards, args.out)


if __name__ == "__main__":
    main()
