"""DVC stage `shard`: write WebDataset .tar shards and manifest.json (counts, sha256) for every split."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.shard import shard_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    shard_stage(load_params(args.params), args.prepared, args.out)


if __name__ == "__main__":
    main()
