"""Fault injection for the fault-tolerance tests, kept out of params.yaml (users never see it).

A test sets LATENTZOO_INJECT_FAULT in the driver's environment to one planned failure, `<point>=<n>`:

    train.epoch=2   a training run that has not resumed from a checkpoint raises at the start of epoch index 2
    tune.trial=2    trial number 2 of a search raises before it trains

The driver reads it when it builds a job (`planned`) and the number travels with the job as plain data, so Ray's
worker processes (started with the cluster's environment, not the test's) see it too. It is no part of params,
run names or MLflow.

LATENTZOO_PAUSE_WRITING=<flag file> makes a process's first atomic output (`latentzoo.atomic`) pause once its
temporary sibling exists: the process writes that output's name to the flag file and sleeps, so a test can send a
real stage a real signal while it is writing (`pause_writing`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from latentzoo.errors import ConfigError

ENV = "LATENTZOO_INJECT_FAULT"
POINTS = ("train.epoch", "tune.trial")
PAUSE_ENV = "LATENTZOO_PAUSE_WRITING"
PAUSE_S = 120.0
SETTLE_S = 2.0  # train.epoch: how long the failure waits for Ray Train's controller to take the last report
_paused: list[int] = []  # the pid that paused: once per process


class InjectedFailure(RuntimeError):
    """The planned failure (tests of fault tolerance only)."""


def planned(point: str) -> int | None:
    """Where `point` is planned to fail (LATENTZOO_INJECT_FAULT), or None."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    name, _, number = value.partition("=")
    if name not in POINTS or not number.isdigit():
        raise ConfigError(f"{ENV}={value!r}: expected <point>=<n> with point one of {', '.join(POINTS)}")
    return int(number) if name == point else None


def fail_if_planned(point: str, planned_at: int | None, now: int) -> None:
    """Raise the planned failure when `now` is where `point` was planned to fail.

    A worker that fails a moment after an epoch's report can beat Ray Train's controller to that report (the
    controller takes reports by polling the workers), and the retry then resumes one epoch earlier: real, and
    harmless, but not what the tests of resuming check, so a planned train.epoch failure first gives the controller
    SETTLE_S to take the report."""
    if planned_at is not None and planned_at == now:
        if point == "train.epoch" and now > 0:
            time.sleep(SETTLE_S)
        raise InjectedFailure(f"{ENV}: injected failure at {point}={now} (tests only)")


def pause_writing(output: Path) -> None:
    """With LATENTZOO_PAUSE_WRITING set, the first call in a process's main thread writes `output` to the flag file
    it names and sleeps PAUSE_S seconds (a signal ends the sleep as it would end the write)."""
    flag = os.environ.get(PAUSE_ENV)
    if not flag or os.getpid() in _paused or threading.current_thread() is not threading.main_thread():
        return
    _paused.append(os.getpid())
    Path(flag).write_text(f"{output}\n")
    time.sleep(PAUSE_S)
