"""Ray tasks for the data stages: prepare's image checks and shard's shards run as tasks on the cluster at
RAY_ADDRESS (`make repro`'s local head, or a real cluster), as many at once as it has CPUs; without one, in the
stage's own process. The results are the same either way; only the time differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from latentzoo.data.sources import Mapper, in_process
from latentzoo.errors import LatentzooError
from latentzoo.training.cluster import connect_ray

TASK_RETRIES = 3  # a task whose worker died, or that failed reading or writing a file (OSError), runs again


def task_mapper() -> Mapper:
    """`ray_tasks` on a cluster (RAY_ADDRESS set), else `in_process`."""
    return ray_tasks if os.environ.get("RAY_ADDRESS") else in_process


def data_task(task: Callable[[Any], Any], job: Any) -> Any:
    """One job of a data stage, run by a Ray task (the name Ray shows for it)."""
    return task(job)


def ray_tasks(task: Callable[[Any], Any], jobs: list) -> Iterator[Any]:
    """Every job as a Ray task (one CPU each) on the cluster at RAY_ADDRESS; their results in order. A task that
    failed on bad data raises its own error here (a DataError naming the file), not Ray's wrapper."""
    import ray

    connect_ray()
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[OSError])(data_task)
    shared = ray.put(task)
    pending = [remote.remote(shared, job) for job in jobs]
    try:
        for ref in pending:
            yield ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (LatentzooError, OSError)):
            raise err.cause from None
        raise
    finally:  # stopped early (an error, Ctrl-C, a consumer that stops reading): no task writes on
        cancel_unfinished(pending)


def cancel_unfinished(refs: list) -> None:
    """Cancel the tasks of `refs` that have not finished. Only those: cancelling a task whose reply is being
    processed can crash the driver's Ray core ("Tried to complete task that was not pending", ray#54527), which
    a consumer that stops reading after the last result (prepare's zip) used to trigger for every task."""
    import ray

    if not refs:
        return
    _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    for ref in unfinished:
        ray.cancel(ref)
