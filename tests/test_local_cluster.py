"""`make repro`'s shared Ray head: stages connect to it through RAY_ADDRESS, and it is gone afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import make_params

from latentzoo import local_cluster

pytestmark = pytest.mark.ray

CONNECT = (
    "import os, ray; ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR'); "
    "print('cpus', int(ray.cluster_resources()['CPU']))"
)


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
    code = local_cluster.run(
        [sys.executable, "-c", "import os, sys; sys.exit(os.environ['RAY_ADDRESS'] != '10.0.0.1:6379')"]
    )
    assert code == 0


def test_the_exit_status_of_the_command_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert local_cluster.run([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_no_command_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "latentzoo.local_cluster", "--"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no command given" in proc.stderr


TOKEN_CHECK = """
import os, subprocess, sys, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
print("token auth", get_authentication_mode() == AuthenticationMode.TOKEN, "cpus", int(ray.cluster_resources()["CPU"]))
no_token = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
probe = "import os, ray; ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR')"
refused = subprocess.run([sys.executable, "-c", probe], env=no_token, capture_output=True, text=True, timeout=120)
print("without the token:", "refused" if refused.returncode else "connected")
"""


def test_a_fresh_home_gets_a_head_with_token_authentication(tmp_path):
    """The bug of a fresh machine: no ~/.ray/auth_token, so `ray start --head` in token mode failed. Now the head
    makes its own token, the command reaches it with that token, a client without it is refused, and the home
    stays empty."""
    home = tmp_path / "home"
    home.mkdir()
    params = make_params(**{"ray.num_cpus": 1}).model_dump()  # validated whole, read for ray.num_cpus
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-m", "latentzoo.local_cluster", "--", sys.executable, "-c", TOKEN_CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "token auth True cpus 1" in proc.stdout and "without the token: refused" in proc.stdout
    assert list(home.iterdir()) == [], "nothing is read from or written to the home directory"


def test_a_failing_ray_start_is_one_line(tmp_path, monkeypatch, capsys):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ray").write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo '  File x, line 1' >&2\necho 'RuntimeError: no room for a head' >&2\nexit 1\n"
    )
    (fake_bin / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        local_cluster.main(["--params", str(tmp_path / "none.yaml"), "--", "true"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ray start --head failed: ")
    assert "RuntimeError: no room for a head" in err


def test_a_head_address_reaches_the_jobs_processes_so_ray_trains_controller_finds_its_own_cluster(monkeypatch):
    """Ray Train's controller asks the state API about its actors; without RAY_ADDRESS in its environment Ray
    searches the machine and fails where two clusters run ("Found multiple active Ray instances")."""
    from latentzoo.training.cluster import JOB_CONFIG_ENV, forwarded_env

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    for address in ("10.0.0.1:6379", "http://head:8265"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert forwarded_env()["RAY_ADDRESS"] == address
    for address in ("auto", "ray://head:10001"):  # nothing a worker could use
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert "RAY_ADDRESS" not in forwarded_env()
    monkeypatch.delenv("RAY_ADDRESS")
    assert "RAY_ADDRESS" not in forwarded_env()
