"""The shard stage: the prepared index as WebDataset shards with a manifest (`latentzoo.data.shards`).

On a Ray cluster (RAY_ADDRESS: `make repro`'s local head, or a real cluster) every shard is a Ray task that reads
its images from the source and writes its tar, as many at once as the cluster has CPUs; without one, this process
writes the shards one after another. The shards are the same bytes either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from latentzoo.config import Params
from latentzoo.data.shards import ShardJob, ShardTask, in_process, write_shards
from latentzoo.errors import LatentzooError
from latentzoo.training.cluster import connect_ray

TASK_RETRIES = 3  # a task whose worker died, or that failed reading or writing a file (OSError), runs again


def shard_stage(params: Params, prepared_dir: Path, out_dir: Path) -> dict:
    mapper = ray_tasks if os.environ.get("RAY_ADDRESS") else in_process
    manifest = write_shards(
        Path(prepared_dir), Path(out_dir), params.shard.maxcount, mapper=mapper, location=params.shard.uri
    )
    for split, entry in manifest["splits"].items():
        where = f" in {manifest['location']}" if manifest.get("location") else ""
        print(f"shard: {split}: {entry['count']} samples in {len(entry['shards'])} shard(s){where}")
    return manifest


def shard_task(task: ShardTask, job: ShardJob) -> dict:
    """One shard written by a Ray task (the name Ray shows for it)."""
    return task(job)


def ray_tasks(task: ShardTask, jobs: list[ShardJob]) -> Iterator[dict]:
    """Every job as a Ray task (one CPU each) on the cluster at RAY_ADDRESS; their results in order. A task that
    failed on bad data raises its own error here (a DataError naming the file), not Ray's wrapper."""
    import ray

    connect_ray()
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[OSError])(shard_task)
    shared = ray.put(task)
    pending = [remote.remote(shared, job) for job in jobs]
    try:
        for ref in pending:
            yield ray.get(ref)
    except BaseException as err:
        for ref in pending:  # the stage stops: no task writes on into its temporary folder
            ray.cancel(ref)
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, (LatentzooError, OSError)):
            raise err.cause from None
        raise
