"""The prepare stage: a real image source, validated and split deterministically (`latentzoo.data.prepare`); an
image folder's files are checked by Ray tasks on a cluster (`latentzoo.stages.tasks`)."""

from __future__ import annotations

from pathlib import Path

from latentzoo.config import Params
from latentzoo.data.prepare import prepare
from latentzoo.stages.tasks import task_mapper


def prepare_stage(params: Params, out_dir: Path) -> dict:
    info = prepare(params.data, params.seed, Path(out_dir), mapper=task_mapper())
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    print(
        f"prepare: {params.data.source} → {out_dir}: {counts}; image shape {info['image_shape']}; "
        f"skipped {info['skipped']['count']}"
    )
    return info
