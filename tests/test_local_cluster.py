"""`make repro`'s shared Ray head: stages connect to it through RAY_ADDRESS, and it is gone afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from latentzoo import local_cluster

pytestmark = pytest.mark.ray

CONNECT = ("import os, ray; ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR'); "
           "print('cpus', int(ray.cluster_resources()['CPU']))")


def test_a_command_runs_against_one_shared_head_that_stops_afterwards(monkeypatch, capfd):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ports = []
    real = local_cluster.free_port
    monkeypatch.setattr(local_cluster, "free_port", lambda: ports.append(real()) or ports[-1])
    code = local_cluster.run([sys.executable, "-c", CONNECT], num_cpus=1)
    assert code == 0
    out = capfd.readouterr().out
    assert f"one Ray head for every stage at 127.0.0.1:{ports[0]}" in out and "cpus 1" in out
    assert not local_cluster.listening(ports[0])  # the head was stopped with the command
    from ray._private.utils import read_ray_address

    assert not (read_ray_address() or "").endswith(f":{ports[0]}")  # no stale address for a later ray.init()


def test_an_existing_cluster_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    code = local_cluster.run([sys.executable, "-c", "import os, sys; sys.exit(os.environ['RAY_ADDRESS'] != "
                                                    "'10.0.0.1:6379')"])
    assert code == 0


def test_the_exit_status_of_the_command_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert local_cluster.run([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_no_command_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "latentzoo.local_cluster", "--"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no command given" in proc.stderr
