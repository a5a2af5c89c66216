"""The shard stage: the prepared index as WebDataset shards with a manifest (`latentzoo.data.shards`), one Ray task
per shard on a cluster (`latentzoo.stages.tasks`); the shards are the same bytes however they were written."""

from __future__ import annotations

from pathlib import Path

from latentzoo.config import Params
from latentzoo.data.shards import write_shards
from latentzoo.stages.tasks import task_mapper


def shard_stage(params: Params, prepared_dir: Path, out_dir: Path) -> dict:
    manifest = write_shards(
        Path(prepared_dir), Path(out_dir), params.shard.maxcount, mapper=task_mapper(), location=params.shard.uri
    )
    for split, entry in manifest["splits"].items():
        where = f" in {manifest['location']}" if manifest.get("location") else ""
        print(f"shard: {split}: {entry['count']} samples in {len(entry['shards'])} shard(s){where}")
    return manifest
