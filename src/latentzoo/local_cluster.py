"""Run a command (e.g. `dvc repro`) against one local Ray head shared by all its stages.

Every Ray stage would otherwise start and stop its own local Ray (tens of seconds each on a laptop). With
RAY_ADDRESS set, a stage connects to that cluster instead (`latentzoo.training.trainer.connect_ray`):

    python -m latentzoo.local_cluster -- dvc repro        # what `make repro` runs

The head is `ray start --head --block` in its own process group, on a free port, with `ray.num_cpus` CPUs from
params.yaml; it is stopped (the whole group) when the command ends, however it ends. Ray's token authentication
is on for the head and the command (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token, made if missing): a
client left to Ray's default would not send the token the head asks for. With RAY_ADDRESS already set, the
command simply runs against that cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from latentzoo.errors import LatentzooError

AUTH = {"RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def local_head(num_cpus: int | None = None, timeout_s: float = 120.0, dashboard_port: int | None = None
               ) -> Iterator[str]:
    """Start a Ray head on a free loopback port; yield its address ('127.0.0.1:<port>'); stop it on exit.
    With `dashboard_port`, the dashboard (and its job server, for `ray job submit`) listens there too."""
    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    # Its own temp dir: `ray start` records its address in <temp dir>/ray_current_cluster, and a stale record in
    # the default /tmp/ray would send every later plain `ray.init()` on this machine to the stopped head.
    temp_dir = tempfile.mkdtemp(prefix="lz-ray-", dir="/tmp")
    # The job agent's ports are fixed by default (52365): another Ray on this machine would take them first.
    dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    cmd = [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           *(dashboard if dashboard_port else ["--include-dashboard=false"]), "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **AUTH})
    try:
        deadline = time.monotonic() + timeout_s
        while not listening(port):
            if head.poll() is not None:
                raise LatentzooError(f"ray start --head failed: {head.stderr.read().decode(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise LatentzooError(f"the local Ray head did not listen on port {port} within {timeout_s:.0f}s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(head: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the head's process group (gcs, raylet, workers), SIGKILL what is left after `grace_s`.

    `ray start --block` lingers ~30 s after SIGTERM once workers have run; the head is throwaway (its own temp
    dir, removed next), so nothing is lost by not waiting for it.
    """
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def run(command: list[str], num_cpus: int | None = None) -> int:
    """Run `command` with RAY_ADDRESS pointing at a shared local head (or the cluster already set)."""
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(command)
    with local_head(num_cpus) as address:
        print(f"local_cluster: one Ray head for every stage at {address}", flush=True)
        return subprocess.call(command, env={**os.environ, **AUTH, "RAY_ADDRESS": address})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="for ray.num_cpus")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- dvc repro")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (e.g. -- dvc repro)")
    num_cpus = None
    if args.params.exists():
        from latentzoo.config import load_params

        num_cpus = load_params(args.params).ray.num_cpus
    return run(command, num_cpus)


if __name__ == "__main__":
    sys.exit(main())
