"""The shard stage: the prepared splits as WebDataset shards with a manifest (`latentzoo.data.shards`)."""

from __future__ import annotations

from pathlib import Path

from latentzoo.config import Params
from latentzoo.data.shards import write_shards


def shard_stage(params: Params, prepared_dir: Path, out_dir: Path) -> dict:
    manifest = write_shards(Path(prepared_dir), Path(out_dir), params.shard.maxcount)
    for split, entry in manifest["splits"].items():
        print(f"shard: {split}: {entry['count']} samples in {len(entry['shards'])} shard(s)")
    return manifest
