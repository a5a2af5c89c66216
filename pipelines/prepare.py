"""DVC stage `prepare`: read the image source, validate it, split it deterministically."""

import argparse
from pathlib import Path

import stage_env  # noqa: F401  (before latentzoo: re-runs the stage under .venv/bin/python if need be)

from latentzoo.config import load_params
from latentzoo.errors import cli_errors
from latentzoo.stages.prepare import prepare_stage


@cli_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, required=True, help="prepared split arrays + prepare.json")
    args = ap.parse_args(argv)
    prepare_stage(load_params(args.params), args.out)


if __name__ == "__main__":
    main()
