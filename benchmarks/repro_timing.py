"""Wall time of `make repro` on params.yaml from a clean workspace, then of the no-op `dvc repro` after it.

The project (src, pipelines, dvc.yaml, params.yaml, .dvc/config, .dvcignore) is copied into a temp dir with
`git init` and no outputs, no dvc.lock and no DVC cache, then

    python -m latentzoo.local_cluster -- dvc repro        # what `make repro` runs (the venv's python and dvc)

runs twice: from clean, and again with nothing changed. MLflow logs into a sqlite file in the temp dir and
RAY_ADDRESS is unset, so the runs touch neither the repo nor a user's cluster. The output streams through with
the elapsed time; each stage's seconds run from its "Running stage '<name>'" line to the next one (or the end),
so they include DVC's caching of its outputs. Target: the clean run within 600 s (PASS/FAIL text).

    .venv/bin/python benchmarks/repro_timing.py           # params.yaml as it is: several minutes
    .venv/bin/python benchmarks/repro_timing.py --quick   # the test suite's tiny params; writes only with --out

Writes benchmarks/results/repro_timing.json (or --out). Exits non-zero only on errors (a failed `dvc repro`),
never on slowness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results_io import provenance, read_params, write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 600.0
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# The test suite's tiny pipeline (tests/test_pipeline.py's `project` fixture), for --quick.
TINY = {
    "train": {"epochs": 2, "batch_size": 32},
    "vae": {"latent_dim": 4, "hidden_channels": 8, "fc_hidden": 32},
    "vqvae": {"hidden_channels": 8, "codebook_dim": 8, "codebook_size": 64},
    "simvq": {"hidden_channels": 8, "codebook_dim": 8, "codebook_size": 64},
    "resvae_gan": {"width": 8, "blocks": 0, "latent_channels": 2, "disc_width": 8, "disc_start": 10},
    "classifier": {"epochs": 2, "width": 8, "feature_dim": 16, "num_samples": 200},
    "tune": {"num_samples": 2, "epochs": 1},
    "stacked_ae": {"layers": [32, 16], "pretrain_epochs": 1},
    "finetune": {"epochs": 2},
}


def copy_project(dest: Path, quick: bool) -> dict:
    """The pipeline's sources and config in `dest`, a fresh git repository; the params.yaml used."""
    for name in ("src", "pipelines"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc/config", dest / ".dvc/config")
    params = read_params()
    if quick:
        for section, values in TINY.items():
            params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return params


def timed_repro(project: Path, bin_dir: Path) -> dict:
    """Run `local_cluster -- dvc repro` in `project`, echoing its output with timestamps; wall and stage seconds."""
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # stages run `python`
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)  # local_cluster would otherwise use that cluster instead of its own head
    cmd = [str(bin_dir / "python"), "-m", "latentzoo.local_cluster", "--", str(bin_dir / "dvc"), "repro"]
    starts: list[tuple[str, float]] = []
    head_s, tail = None, []
    start = time.monotonic()
    # Its own process group, so an interrupt reaches local_cluster, which then stops its Ray head.
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            now = time.monotonic() - start
            print(f"[{now:7.1f}s] {line.rstrip()}", flush=True)
            tail = (tail + [line.rstrip()])[-40:]
            if match := STAGE_LINE.search(line):
                starts.append((match.group(1), now))
            elif head_s is None and line.startswith("local_cluster:"):
                head_s = now
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.monotonic() - start
    ends = [t for _, t in starts[1:]] + [wall]
    return {
        "wall_s": wall,
        "returncode": rc,
        "ray_head_ready_s": head_s,
        "stages_run": len(starts),
        "stage_s": {name: end - t for (name, t), end in zip(starts, ends)},
        "up_to_date": any("up to date" in line for line in tail),
        **({"output_tail": tail} if rc else {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / ".venv/bin", help="the venv's bin (python, dvc)")
    ap.add_argument("--quick", action="store_true", help="tiny params (the test suite's), marked smoke")
    ap.add_argument("--keep", type=Path, default=None, help="run in this (new) directory and keep it")
    ap.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/repro_timing.json; none with --quick)"
    )
    args = ap.parse_args()

    result = {
        **provenance(),
        "smoke": args.quick,
        "params": "tiny (tests/test_pipeline.py)" if args.quick else "params.yaml",
        "target_s": TARGET_S,
    }
    with tempfile.TemporaryDirectory(prefix="lz-repro-") as d:
        project = args.keep.resolve() if args.keep else Path(d)
        project.mkdir(parents=True, exist_ok=True)
        params = copy_project(project, args.quick)
        result |= {
            "models": params["models"],
            "epochs": params["train"]["epochs"],
            "train_workers": params["train"]["num_workers"],
            "data_source": params["data"]["source"],
        }
        result["clean"] = clean = timed_repro(project, args.bin.resolve())
        if clean["returncode"] == 0:
            result["noop"] = noop = timed_repro(project, args.bin.resolve())
            result["noop_over_clean"] = noop["wall_s"] / clean["wall_s"]
    result["clean_over_target"] = clean["wall_s"] / TARGET_S
    result["target"] = "PASS" if clean["returncode"] == 0 and clean["wall_s"] <= TARGET_S else "FAIL"

    print(json.dumps({k: v for k, v in result.items() if k not in ("clean", "noop")}, indent=2))
    for name in ("clean", "noop"):
        if name in result:
            run = result[name]
            print(
                f"{name:6s} dvc repro: {run['wall_s']:7.1f} s, {run['stages_run']} stage(s) run, "
                f"exit {run['returncode']}"
            )
    for stage, seconds in sorted(clean["stage_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:24s} {seconds:7.1f} s")
    print(f"{result['target']}  clean repro {clean['wall_s']:.0f} s (target <= {TARGET_S:.0f} s)")
    if args.out or not args.quick:
        write_result("repro_timing", result, args.out)
    failed = [name for name in ("clean", "noop") if result.get(name, {}).get("returncode")]
    if failed:
        print(f"error: dvc repro failed ({', '.join(failed)}); see output_tail in the result", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
