"""DVC stage `classifier`: the small classifier whose features every evaluation's Fréchet distance uses."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.classifier import classifier_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="model directory (model.pt)")
    ap.add_argument("--metrics", type=Path, required=True, help="test accuracy (DVC metrics)")
    args = ap.parse_args(argv)
    classifier_stage(load_params(args.params), args.shards, args.out, args.metrics)


if __name__ == "__main__":
    main()
