"""DVC stage `pretrain`: greedy layer-wise pretraining of the stacked autoencoder, one Ray Train run per layer."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.stacked import pretrain_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the pretrained stack (model.pt, layer-<k>/)")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args(argv)
    params = load_params(args.params)  # validated before Ray starts
    pretrain_stage(params, args.shards, args.out, args.metrics, args.plots)


if __name__ == "__main__":
    main()
