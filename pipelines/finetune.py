"""DVC stage `finetune`: supervised fine-tuning of the pretrained stack, its random-init baseline and a linear probe."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.stacked import finetune_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--pretrained", type=Path, required=True, help="the pretrain stage's output folder")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="one folder per variant (pretrained, random, probe)")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args(argv)
    params = load_params(args.params)  # validated before Ray starts
    finetune_stage(params, args.pretrained, args.shards, args.out, args.metrics, args.plots)


if __name__ == "__main__":
    main()
