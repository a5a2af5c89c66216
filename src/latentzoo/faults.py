"""Fault injection for the fault-tolerance tests, kept out of params.yaml (users never see it).

A test sets LATENTZOO_INJECT_FAULT in the driver's environment to one planned failure, `<point>=<n>`:

    train.epoch=2   a training run that has not resumed from a checkpoint raises at the start of epoch index 2
    tune.trial=2    trial number 2 of a search raises before it trains

The driver reads it when it builds a job (`planned`) and the number travels with the job as plain data, so Ray's
worker processes (started with the cluster's environment, not the test's) see it too. It is no part of params,
run names or MLflow.
"""

from __future__ import annotations

import os

from latentzoo.errors import ConfigError

ENV = "LATENTZOO_INJECT_FAULT"
POINTS = ("train.epoch", "tune.trial")


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
    """Raise the planned failure when `now` is where `point` was planned to fail."""
    if planned_at is not None and planned_at == now:
        raise InjectedFailure(f"{ENV}: injected failure at {point}={now} (tests only)")
