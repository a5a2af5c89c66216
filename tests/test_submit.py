"""`latentzoo submit`: stages run as a Ray job on a cluster (here a local head with its job server), the logs
stream back, and the outputs land in this DVC workspace and cache."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from latentzoo.errors import LatentzooError
from latentzoo.submit import EXCLUDES, job_address, pack_changed, runtime_env, unpack

BIN = Path(sys.executable).parent


def test_only_changed_outputs_are_packed(tmp_path):
    lock = {
        "stages": {"a": {"outs": [{"path": "data/a", "md5": "1"}]}, "b": {"outs": [{"path": "b.json", "md5": "2"}]}}
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a").write_text("unchanged")
    (tmp_path / "b.json").write_text("new")
    data = pack_changed(tmp_path, before={"data/a": "1", "b.json": "old"})
    assert sorted(tarfile.open(fileobj=io.BytesIO(data)).getnames()) == ["b.json", "dvc.lock"]


def test_runtime_env_uploads_the_workspace_without_its_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    extra = tmp_path / "env.yaml"
    extra.write_text(yaml.safe_dump({"pip": ["torch==2.13.0"], "excludes": ["big/"]}))
    env = runtime_env(extra)
    assert env["working_dir"] == "." and set(EXCLUDES) | {"big/"} == set(env["excludes"])
    assert env["pip"] == ["torch==2.13.0"]
    assert env["env_vars"] == {"PYTHONPATH": "src", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # a local store is not the cluster's
    assert "MLFLOW_TRACKING_URI" not in runtime_env(None)["env_vars"]


def test_the_job_server_must_be_an_http_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(LatentzooError, match="http\\(s\\)://<head>:8265"):
        job_address(None)
    assert job_address("http://head:8265") == "http://head:8265"


def test_submission_waits_for_the_job_agent():
    from latentzoo.submit import submit_when_ready

    class Client:
        calls = 0

        def submit_job(self, **job):
            Client.calls += 1
            if Client.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job")

    submit_when_ready(Client(), entrypoint="true")
    assert Client.calls == 3


def wait_for(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # 401: up, and asking for the cluster's token
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s} s"
            time.sleep(1)


@pytest.mark.ray
@pytest.mark.cluster
def test_submit_runs_stages_on_the_cluster_and_brings_the_outputs_back(tmp_path, monkeypatch):
    from latentzoo.local_cluster import free_port, local_head

    project = tmp_path / "project"
    for name in ("src", "pipelines"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", "params.yaml", ".dvc/config"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    monkeypatch.setenv("PATH", f"{BIN}:{plain_path}")  # the head's, so the job's `python` and `dvc`
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    with local_head(num_cpus=1, dashboard_port=port) as head:
        wait_for(f"http://127.0.0.1:{port}/api/version")
        done = subprocess.run(
            [
                str(BIN / "latentzoo"),
                "submit",
                "--address",
                f"http://127.0.0.1:{port}",
                "--results",
                str(tmp_path / "results"),
                "--",
                "dvc",
                "repro",
                "shard",
            ],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **head.auth, "PATH": plain_path},  # `.venv/bin/latentzoo submit` from a plain shell
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'shard'" in done.stdout  # the job's logs streamed here
    assert (project / "data/shards/manifest.json").exists() and (project / "data/prepared").is_dir()
    status = subprocess.run([str(BIN / "dvc"), "status", "shard"], cwd=project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status  # the job's stages: outputs, dvc.lock and the local cache agree
    assert any((project / ".dvc/cache").rglob("*")), "the outputs are in the local DVC cache"


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A DVC workspace with the project's dvc.yaml and params.yaml (what `unpack` checks a results tar against)."""
    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvc/config"):
        shutil.copy(ROOT / name, ws / name)
    subprocess.run([str(BIN / "dvc"), "config", "--local", "core.no_scm", "true"], cwd=ws, check=True)
    return ws


def results_tar(lock_outs: list[str], files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A results tar as a job would pack it: dvc.lock listing `lock_outs` (stage shard), then `files`, `links`."""
    lock = {"schema": "2.0", "stages": {"shard": {"cmd": "x", "outs": [{"path": p, "md5": "1"} for p in lock_outs]}}}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in {"dvc.lock": yaml.safe_dump(lock).encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("tar", "refusal"),
    [
        (  # a planted hook and a package file beside a real output
            results_tar(
                ["data/shards"],
                {"data/shards/manifest.json": b"{}", ".git/hooks/post-checkout": b"#!/bin/sh\necho owned\n"},
            ),
            ".git/hooks/post-checkout, which is no output",
        ),
        (results_tar(["data/shards"], {"src/latentzoo/__init__.py": b"import os"}), "src/latentzoo/__init__.py"),
        (  # a lock that lists the target as an output
            results_tar(["src/latentzoo/__init__.py"], {"src/latentzoo/__init__.py": b"import os"}),
            "outputs dvc.yaml does not declare",
        ),
        (results_tar(["data/shards"], {}, links={"data/shards/x": "/etc/passwd"}), "not a plain file or folder"),
        (results_tar(["data/shards"], {"../escape.txt": b"x"}), "../escape.txt, which is no output"),
    ],
    ids=["planted-hook", "package-file", "lock-lists-code", "symlink", "outside"],
)
def test_unpack_takes_only_the_outputs_the_lock_lists_and_dvc_yaml_declares(workspace, tar, refusal):
    def files():  # but DVC's own .dvc/tmp
        return sorted(p.relative_to(workspace) for p in workspace.rglob("*") if ".dvc" not in p.parts)

    before = files()
    with pytest.raises(LatentzooError, match=re.escape(refusal)):
        unpack(tar, workspace)
    assert files() == before  # nothing written
    assert not (workspace.parent / "escape.txt").exists()


def test_a_results_tar_without_a_lock_is_refused(workspace):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    with pytest.raises(LatentzooError, match="no dvc.lock"):
        unpack(buffer.getvalue(), workspace)


def test_the_job_runs_the_uploaded_code_whatever_the_runtime_env_file_says():
    env = runtime_env(ROOT / "infra/kuberay/runtime-env.yaml")
    assert env["env_vars"]["PYTHONPATH"] == "src" and env["working_dir"] == "."


def test_dvc_is_found_beside_the_running_python(monkeypatch):
    from latentzoo.submit import tool

    monkeypatch.setenv("PATH", "/nonexistent")
    assert tool("dvc") == str(BIN / "dvc") and Path(tool("dvc")).exists()
    assert tool("no-such-tool") == "no-such-tool"
