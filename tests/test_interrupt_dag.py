"""Every stage of the DAG, run by `dvc repro` as its real `pipelines/<stage>.py`, stopped while it writes its
output, by Ctrl-C (SIGINT to the terminal's process group: DVC ignores it, the stage exits 130) or by a scheduler's
SIGTERM to `dvc` alone (DVC dies at once; the stage, which waits on DVC's pidfd, sends itself SIGTERM,
`errors.stop_with_dvc`, and exits 143): the two signals in turn down the DAG, each stage stopped once (what is the
stage's own, the cleanup of its outputs, is the same under both, and every stop costs the stage's whole work up to
its first write). DVC runs each command with `/bin/sh -c` here, dash on Debian, which stays between DVC and the
stage (bash would exec it: tests/test_bad_input.py covers both). Each time nothing is left under the stage's
outputs, no temporary sibling either, and the next `dvc repro` of the stage completes. The project runs untracked
(`tracking.enabled: false`): the whole DAG without MLflow, its training in Ray Train's local mode
(`train.num_workers: 0`, as `test_pipeline.copy_pipeline` sets it).

"While it writes" is made exact with the tests-only hook LATENTZOO_PAUSE_WRITING: the stage's first atomic output
pauses once its temporary sibling exists (`faults.pause_writing`). The train and tune stages are also stopped
mid-training and mid-search in tests/test_interrupt_stages.py and tests/test_tune.py."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_bad_input import interactive_signals
from test_pipeline import DVC, copy_pipeline, without_venv

from latentzoo.faults import PAUSE_ENV

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

STAGES = ("prepare", "shard", "classifier", "tune@vae", "train@vae", "evaluate@vae", "pretrain", "finetune", "report")


def outputs_of(project: Path) -> dict[str, list[Path]]:
    """{stage: the paths of its outputs}, as DVC reads dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {stage.name: [Path(out.fs_path) for out in stage.outs] for stage in repo.index.stages}


def stop_while_writing(project: Path, stage: str, env: dict, sig: int) -> tuple[int, str]:
    """`dvc repro -s <stage>` paused in its first write, then `sig`: SIGINT to the process group (Ctrl-C), SIGTERM
    to dvc alone. DVC's exit status and everything printed, the stage's lines included (it holds the pipe)."""
    flag = project.parent / "writing"
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [DVC, "repro", "-s", stage],
        cwd=project,
        env={**env, PAUSE_ENV: str(flag)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
        preexec_fn=interactive_signals,
    )
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, f"{stage} ended before it wrote: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage} never started writing"
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)  # until the stage, too, has closed the pipe
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    return proc.returncode, output


def left_behind(paths: list[Path]) -> list[str]:
    """Any of `paths`, or a hidden temporary sibling of one (`.<name>.tmp-<pid>`), that exists."""
    found = [p for p in paths if p.exists() or p.is_symlink()]
    found += [t for p in paths if p.parent.is_dir() for t in p.parent.glob(f".{p.name}.*")]
    return sorted(str(p) for p in found)


def test_every_stage_stopped_while_writing_leaves_nothing_and_completes_next_time(ray_cluster, tmp_path):
    import ray

    project = copy_pipeline(tmp_path / "project", families=("vae",))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    params["tune"]["num_samples"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": without_venv(os.environ["PATH"]),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",  # never opened: tracking is off
        "LATENTZOO_DEBUG": "",
        "SHELL": "/bin/sh",  # DVC runs each stage with `$SHELL -c`: Debian's dash stays between DVC and the stage
    }
    outs = outputs_of(project)
    assert set(STAGES) == set(outs), "a stage of dvc.yaml this test does not stop"
    # SIGTERM first, so that tune@vae gets the Ctrl-C: its search has ended when it writes, and a Ctrl-C then must
    # still stop it with 130 and no best.yaml (it once exited 0, as if nothing had happened)
    for stage, sig in zip(STAGES, itertools.cycle((signal.SIGTERM, signal.SIGINT))):
        code, output = stop_while_writing(project, stage, env, sig)
        if sig == signal.SIGINT:
            # bash execs a lone command, so DVC sees the stage's 130; dash stays between them and dies of SIGINT (-2)
            assert code != 0 and re.search(r"exited with (130|-2)\b", output), f"{stage}: {output[-3000:]}"
            assert "interrupted: nothing was written under the final output names" in output, output[-3000:]
        else:
            assert code == -signal.SIGTERM, f"{stage}: {output[-3000:]}"
            assert "terminated: nothing was written under the final output names" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert left_behind(outs[stage]) == [], stage

        done = subprocess.run([DVC, "repro", "-s", stage], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{stage}: {(done.stdout + done.stderr)[-3000:]}"
        assert all(p.exists() for p in outs[stage]), stage

    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
    status = subprocess.run([DVC, "status"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout  # every stage done, none left changed
