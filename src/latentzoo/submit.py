"""Run pipeline stages on a Ray cluster as a Ray job, and bring their outputs back into this DVC workspace.

    latentzoo submit --address http://<head>:8265 --results /mnt/shared/latentzoo-results -- dvc repro train@vae

1. The workspace (code, params, dvc.yaml/dvc.lock and the outputs the stages depend on; not .venv, .git, the DVC
   cache, MLflow's local store or Ray's results) is uploaded as the job's `working_dir` and the command runs
   there through `python -m latentzoo.submit --pack ...`, which afterwards packs `dvc.lock` and every output
   whose hash changed into `<results>/<submission id>.tar` (a path every node and this machine share, or any
   URI pyarrow opens: s3://bucket/prefix, gs://...).
2. The job's logs stream here while it runs; its final status is this command's exit status.
3. The tar is unpacked into the workspace and `dvc commit` stores the outputs in the local DVC cache, so
   `dvc status` is clean and lineage (dvc.lock) is the cluster's run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import posixpath
import shlex
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import yaml

from latentzoo.errors import LatentzooError, cli_errors
from latentzoo.storage import read_file, write_file

EXCLUDES = [
    ".venv",
    ".git",
    ".dvc/cache",
    ".dvc/tmp",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    ".ray_results",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
]


# ---------------------------------------------------------------- storage (local path or URI)


def write_bytes(location: str, name: str, data: bytes) -> str:
    write_file(location, name, data)
    return f"{location.rstrip('/')}/{name}"


def read_bytes(location: str, name: str) -> bytes:
    try:
        return read_file(location, name)
    except (FileNotFoundError, OSError) as err:
        raise LatentzooError(
            f"{location}/{name}: the job's outputs are not there ({err}); is --results a "
            "location both the cluster and this machine reach?"
        ) from None


# ---------------------------------------------------------------- on the cluster: run, then pack the outputs


def locked_outputs(lock_file: Path) -> dict[str, str]:
    """{output path: its md5} of every stage in a dvc.lock."""
    return lock_outputs(lock_file.read_bytes()) if lock_file.exists() else {}


def lock_outputs(lock_text: bytes | str) -> dict[str, str]:
    """{output path: its md5} of every stage in the text of a dvc.lock."""
    lock = yaml.safe_load(lock_text) or {}
    return {
        out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])
    }


def pack_changed(workdir: Path, before: dict[str, str]) -> bytes:
    """A tar of dvc.lock and the outputs whose hash differs from `before` (the lock as submitted)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(workdir / "dvc.lock", arcname="dvc.lock")
        for path, md5 in locked_outputs(workdir / "dvc.lock").items():
            if before.get(path) != md5 and (workdir / path).exists():
                tar.add(workdir / path, arcname=path)
    return buffer.getvalue()


def run_job(command: list[str], results: str, submission_id: str) -> int:
    """The job's entrypoint: run `command` in the working dir, then pack what it changed into `results`."""
    workdir = Path.cwd()
    before = locked_outputs(workdir / "dvc.lock")
    if not (workdir / ".git").exists():  # the upload leaves .git out: DVC works without an SCM in the job's copy
        subprocess.run([tool("dvc"), "config", "--local", "core.no_scm", "true"], check=True)
    status = subprocess.call([tool(command[0]), *command[1:]] if command else command)
    if status == 0:
        where = write_bytes(results, f"{submission_id}.tar", pack_changed(workdir, before))
        print(f"submit: outputs packed into {where}", flush=True)
    return status


# ---------------------------------------------------------------- here: submit, follow, bring back


def job_address(address: str | None) -> str:
    """The cluster's job server (the dashboard, http://<head>:8265), from --address or RAY_ADDRESS."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise LatentzooError(
            f"the job server address must be http(s)://<head>:8265 (the dashboard), got "
            f"{address or 'nothing'}: pass --address or set RAY_ADDRESS"
        )
    return address


def runtime_env(extra: Path | None) -> dict:
    """working_dir = this workspace (minus EXCLUDES), PYTHONPATH to its src/, plus a runtime-env YAML's fields."""
    env = yaml.safe_load(extra.read_text()) if extra else {}
    env = dict(env or {})
    env["working_dir"] = "."
    env["excludes"] = sorted(set(env.get("excludes", [])) | set(EXCLUDES))
    env_vars = dict(env.get("env_vars", {}))
    # The uploaded package, relative to the working dir, always: a runtime-env file's PYTHONPATH (the RayJob's,
    # infra/kuberay/runtime-env.yaml, points at the cluster's shared checkout) would run other code than this.
    env_vars["PYTHONPATH"] = "src"
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):  # a tracking server the cluster reaches too
        env_vars.setdefault("MLFLOW_TRACKING_URI", tracking)
    env["env_vars"] = env_vars
    return env


async def follow(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit(
    command: list[str], address: str | None, results: str, extra_env: Path | None, workspace: Path = Path(".")
) -> str:
    """Submit, stream the logs, unpack the outputs and `dvc commit` them; returns the submission id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(job_address(address))
    submission_id = f"latentzoo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entrypoint = shlex.join(
        ["python", "-m", "latentzoo.submit", "--pack", results, "--id", submission_id, "--", *command]
    )
    submit_when_ready(client, entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env(extra_env))
    print(f"submit: job {submission_id} on {job_address(address)}", flush=True)
    try:
        asyncio.run(follow(client, submission_id))
    except KeyboardInterrupt:
        client.stop_job(submission_id)
        raise
    status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        raise LatentzooError(f"job {submission_id} ended {status.value}; its logs: ray job logs {submission_id}")
    unpack(read_bytes(results, f"{submission_id}.tar"), Path(workspace))
    return submission_id


def submit_when_ready(client, timeout_s: float = 120.0, **job) -> None:
    """`client.submit_job(**job)`, retried while a freshly started head's job agent is not up yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def unpack(data: bytes, workspace: Path) -> list[str]:
    """Extract the job's outputs over the workspace and store them in the DVC cache (`dvc commit`).

    The tar comes from a shared location anyone with access to it could have written, so nothing in it is trusted:
    it is checked whole before anything is written (`checked_members`), and what is extracted is only its
    `dvc.lock` and the outputs that lock lists, each an output the workspace's own dvc.yaml declares."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = checked_members(tar, declared_outputs(workspace))
        tar.extractall(workspace, members=members, filter="data")
    lock = yaml.safe_load((workspace / "dvc.lock").read_text()) or {}
    stages = list(lock.get("stages", {}))  # the stages with a record; their outputs are all here now
    done = subprocess.run(
        [tool("dvc"), "commit", "--force", "--quiet", *stages], cwd=workspace, capture_output=True, text=True
    )
    if done.returncode:
        raise LatentzooError(f"dvc commit of the job's outputs failed: {done.stderr.strip()[-500:]}")
    print(f"submit: {len(members)} path(s) back in the workspace and committed to the DVC cache", flush=True)
    return [m.name for m in members]


def declared_outputs(workspace: Path) -> set[str]:
    """The output paths of the workspace's dvc.yaml (foreach stages expanded), as DVC resolves them."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return {str(Path(out.fs_path).relative_to(Path(repo.root_dir).resolve())) for out in repo.index.outs}


def checked_members(tar: tarfile.TarFile, declared: set[str]) -> list[tarfile.TarInfo]:
    """Every member of the results tar, if each is `dvc.lock` or inside an output that lock lists and dvc.yaml
    declares, and is a plain file or folder; else a LatentzooError naming the first offender, before anything
    is written."""
    members = tar.getmembers()
    lock = next((m for m in members if m.name == "dvc.lock" and m.isfile()), None)
    if lock is None:
        raise LatentzooError("the job's results hold no dvc.lock file: refusing to unpack them")
    listed = set(lock_outputs(tar.extractfile(lock).read()))
    undeclared = sorted(listed - declared)
    if undeclared:
        raise LatentzooError(f"the job's dvc.lock lists outputs dvc.yaml does not declare: {undeclared}; refused")
    for member in members:
        name = posixpath.normpath(member.name)  # "data/../../x" is "../x": outside every output
        if not (member.isfile() or member.isdir()):
            raise LatentzooError(f"the job's results hold {member.name}, not a plain file or folder: refused")
        if name != "dvc.lock" and not any(name == out or name.startswith(out + "/") for out in listed):
            raise LatentzooError(f"the job's results hold {member.name}, which is no output of its dvc.lock: refused")
    return members


def tool(name: str) -> str:
    """A console script of this installation (dvc beside the running Python), whatever PATH says; else `name`."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


@cli_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", metavar="RESULTS", help=argparse.SUPPRESS)  # the job side (internal)
    ap.add_argument("--id", help=argparse.SUPPRESS)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_job(command, args.pack, args.id)


if __name__ == "__main__":
    sys.exit(main())
