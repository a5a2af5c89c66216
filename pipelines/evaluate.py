"""DVC stage `evaluate@<model>`: test-split metrics (DVC metrics) and image grids (DVC plots)."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.evaluate import evaluate_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True, help="folder for the image grids")
    ap.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="the classifier stage's weights (models/classifier/model.pt): adds FCD and sharpness",
    )
    args = ap.parse_args(argv)
    evaluate_stage(
        load_params(args.params), args.model_dir, args.shards, args.metrics, args.plots, classifier=args.classifier
    )


if __name__ == "__main__":
    main()
