"""Run a command (e.g. `dvc repro`) against one local Ray head shared by all its stages.

Every Ray stage would otherwise start and stop its own local Ray (tens of seconds each on a laptop). With
RAY_ADDRESS set, a stage connects to that cluster instead (`latentzoo.training.cluster.connect_ray`):

    python -m latentzoo.local_cluster -- dvc repro        # what `make repro` runs

The head is `ray start --head --block` in its own process group, on a free port, with `ray.num_cpus` CPUs from
params.yaml; it is stopped (the whole group) when the command ends, however it ends. Ray's token authentication
is on: each head gets a fresh random token, handed to the head and to the command through the environment
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), so nothing is read from or written to ~/.ray and a fresh machine works.
With RAY_ADDRESS already set, the command simply runs against that cluster (with the caller's own token).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from latentzoo.config import load_params
from latentzoo.errors import LatentzooError, Terminated, cli_errors


def auth_env() -> dict[str, str]:
    """Token authentication with a fresh random token (256 bits, as `ray get-auth-token --generate` makes)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@dataclass(frozen=True)
class Head:
    """A running local head: its address ('127.0.0.1:<port>') and the environment a client needs to reach it."""

    address: str
    auth: dict[str, str] = field(repr=False)

    def client_env(self, **extra: str) -> dict[str, str]:
        """os.environ plus the head's token and RAY_ADDRESS (and `extra`): for a command that connects to it."""
        return {**os.environ, **self.auth, "RAY_ADDRESS": self.address, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def local_head(
    num_cpus: int | None = None, timeout_s: float = 120.0, dashboard_port: int | None = None
) -> Iterator[Head]:
    """Start a Ray head on a free loopback port with a fresh token; yield it; stop it on exit.
    With `dashboard_port`, the dashboard (and its job server, for `ray job submit`) listens there too."""
    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    # Its own temp dir: `ray start` records its address in <temp dir>/ray_current_cluster, and a stale record in
    # the default /tmp/ray would send every later plain `ray.init()` on this machine to the stopped head.
    temp_dir = tempfile.mkdtemp(prefix="lz-ray-", dir="/tmp")
    # The job agent's ports are fixed by default (52365): another Ray on this machine would take them first.
    dashboard = [
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
    ]
    cmd = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        *(dashboard if dashboard_port else ["--include-dashboard=false"]),
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    auth = auth_env()
    head = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **auth}
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not listening(port):
            if head.poll() is not None:
                raise LatentzooError(f"ray start --head failed: {last_lines(head.stderr.read())}")
            if time.monotonic() > deadline:
                raise LatentzooError(f"the local Ray head did not listen on port {port} within {timeout_s:.0f}s")
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", auth)
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def last_lines(stderr: bytes, n: int = 3, limit: int = 400) -> str:
    """The last `n` non-empty lines of a command's stderr as one line (at most `limit` characters)."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    text = " | ".join(lines[-n:]) or "(nothing on stderr)"
    return text if len(text) <= limit else "..." + text[-limit:]


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
    with local_head(num_cpus) as head:
        print(f"local_cluster: one Ray head for every stage at {head.address}", flush=True)
        return wait_for(subprocess.Popen(command, env=head.client_env()))


def wait_for(command: subprocess.Popen) -> int:
    """The command's exit status. Interrupted, let it clean up first (its stages remove their temporary outputs
    and need the head meanwhile): Ctrl-C reached it already (same process group), SIGTERM is passed on."""
    try:
        return command.wait()
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            command.terminate()
        command.wait()
        raise


@cli_errors
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
        num_cpus = load_params(args.params).ray.num_cpus
    return run(command, num_cpus)


if __name__ == "__main__":
    sys.exit(main())
