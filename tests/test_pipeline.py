"""The DVC DAG end to end on the bundled digits (tiny settings), through `dvc repro` itself."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, stop_mlflow_server, wait_until_up
from test_lineage import compare_reads

from latentzoo import params_reads

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]  # the whole DAG, twice, and a queued run: ~5 min
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

VENV = Path(os.sys.executable).parents[1]  # the venv running the tests (.venv under `make test`)
DVC = str(VENV / "bin" / "dvc")
FAMILIES = ("vae", "resvae_gan")


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def copy_pipeline(dest: Path, families: tuple[str, ...] = FAMILIES) -> Path:
    """A copy of the project's pipeline (no outputs) at `dest`, in its own git repository, with tiny params and
    the listed model families."""
    dest.mkdir()
    for name in ("src", "pipelines"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "Makefile"):  # the real .gitignore: what a clone commits
        shutil.copy(ROOT / name, dest / name)
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, dest / ".dvc" / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = list(families)  # vqvae and simvq through train and evaluate: test_training, test_evaluate
    # Ray Train's local mode: each training runs in its stage's process, without the ~15 s of starting a worker
    # group per run. The train stage on Ray's workers: tests/test_interrupt_stages.py, with DDP across two nodes
    # test_cluster.py; the whole DAG on the default 2 workers: CI's `make repro`.
    params["train"].update(epochs=2, batch_size=32, num_workers=0)
    params["vae"].update(latent_dim=4, hidden_channels=8, fc_hidden=32)
    params["resvae_gan"].update(width=8, blocks=0, latent_channels=2, disc_width=8, disc_start=10)
    params["classifier"].update(epochs=2, width=8, feature_dim=16, num_samples=200)
    params["evaluate"].update(nll_samples=20)
    params["tune"].update(num_samples=2, epochs=1, space={"vae": {"beta": {"low": 0.5, "high": 2.0}}, "resvae_gan": {}})
    params["stacked_ae"].update(layers=[32], pretrain_epochs=1)  # several layers: test_layerwise
    params["finetune"].update(epochs=2, baseline=False, probe=False)  # those two runs: test_layerwise
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".venv").symlink_to(VENV)  # as in a clone after `make install`
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The pipeline's copy, one per module: the browser check opens the MLflow UI on what the pipeline test ran."""
    return copy_pipeline(tmp_path_factory.mktemp("pipeline") / "project")  # its parent: the remote and the clone


def without_venv(path: str) -> str:
    """PATH without the venv's bin: the README's `.venv/bin/...` commands must work from a plain shell."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if Path(p).resolve() != (VENV / "bin").resolve())


def test_dvc_repro_runs_the_dag_then_is_up_to_date(ray_cluster, project: Path):
    import ray

    env = {
        **os.environ,
        "PATH": without_venv(os.environ["PATH"]),  # stages' `python` is not the venv's
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # share the session's Ray
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        # The tiny runs train for under a second (2 epochs of ~0.15 s), and MLflow's monitor logs nothing before its
        # first interval ends: at 0.5 s, CI at 562e7d0 found no system metrics in train@vae's run.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1",
    }
    records = project.parent / "params-reads"  # every stage process writes the params keys it read
    first = run([DVC, "repro"], project, {**env, params_reads.RECORD_ENV: str(records)})
    families = FAMILIES
    stages = (f"{s}@{m}" for s in ("tune", "train", "evaluate") for m in families)
    for stage in ("prepare", "shard", "classifier", *stages, "pretrain", "finetune", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    tuned = yaml.safe_load((project / "tune/vae/best.yaml").read_text())
    assert tuned["searched"] and tuned["trials"]["total"] == 2 and 0.5 <= tuned["weights"]["beta"] <= 2.0
    resolved = yaml.safe_load((project / "models/vae/params.yaml").read_text())
    assert resolved["vae"]["beta"] == tuned["weights"]["beta"]  # the best weight reached the train stage
    assert not yaml.safe_load((project / "tune/resvae_gan/best.yaml").read_text())["searched"]
    for family in families:
        assert f"[{family}] epoch 2/2" in first.stdout + first.stderr  # one progress line per epoch

    test = json.loads((project / "metrics/evaluate/vae.json").read_text())
    assert test["test_neg_elbo"] > 0 and 0 < test["test_psnr"] < 60 and test["test_images"] == 359
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 1258
    report = (project / "reports/report.md").read_text()
    assert all(report.count(f"| {family} |") == 6 for family in families)  # 4 metric tables, likelihood, grids
    assert "| vae | binarised" in report and "| resvae_gan | grey levels" in report
    assert (project / "plots/evaluate/vae/reconstructions.png").exists()
    gan = json.loads((project / "metrics/evaluate/resvae_gan.json").read_text())
    assert gan["test_fid_samples"] > 0 and gan["test_sharpness_samples"] > 0 and gan["test_mean_sigma"] > 0
    assert json.loads((project / "metrics/classifier.json").read_text())["test_accuracy"] > 0.1
    assert "FID (classifier features)" in report and "images/resvae_gan-samples.png" in report
    assert "[training run](http://127.0.0.1:5000/#/experiments/" in report  # each family links to its MLflow run

    stacked = json.loads((project / "metrics/finetune/stacked_ae.json").read_text())
    assert stacked["test_accuracy"] > 0.2
    assert "## stacked_ae: classification" in report
    assert (project / "models/stacked_ae/pretrained/layer-1/model.pt").exists()

    shown = run([DVC, "metrics", "show", "--json"], project, env).stdout
    assert "test_neg_elbo" in shown and "test_accuracy" in shown
    run([DVC, "plots", "show"], project, env)
    assert "reconstructions.png" in (project / "dvc_plots/index.html").read_text()

    # Each stage read only keys dvc.yaml lists for it, and read every one of them (but a search with nothing to
    # search, tune@resvae_gan here: it stops before it reads the train keys).
    skipped = {
        f"tune@{m}" for m in families if not yaml.safe_load((project / f"tune/{m}/best.yaml").read_text())["searched"]
    }
    found = compare_reads(project, records)
    assert {s: r for s, r in found.items() if r["undeclared"] or (r["unread"] and s not in skipped)} == {}

    second = run([DVC, "repro"], project, env)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((project / "models/vae/mlflow_run.json").read_text())["run_id"]
    logged = client.get_run(run_id)
    assert "test_neg_elbo" in logged.data.metrics  # evaluate adds test metrics to the training run
    registered = json.loads((project / "models/vae/mlflow_run.json").read_text())
    version = client.get_model_version(registered["registered_model"], registered["model_version"])
    assert version.run_id == run_id and "test_neg_elbo" in version.tags  # the registry carries test metrics
    assert client.get_experiment_by_name("latentzoo-report") is not None
    # What the MLflow UI shows: system metrics per node, the shards each run read, the champion alias, and one
    # experiment comparing the families.
    assert any(key.startswith("system/node0/cpu") for key in logged.data.metrics)
    digest = run(["sha256sum", "data/shards/manifest.json"], project, env).stdout.split()[0]
    datasets = {(i.dataset.digest, t.value) for i in logged.inputs.dataset_inputs for t in i.tags}
    assert datasets == {(digest[:32], split) for split in ("train", "val", "test")}
    assert str(client.get_model_version_by_alias("latentzoo-vae", "champion").version) == registered["model_version"]
    samples = project.parent / "champion.png"  # the README's command, on the champion
    sample = [str(VENV / "bin/latentzoo"), "sample", "-n", "4", "-o", str(samples)]
    run([*sample, "--model", "models:/latentzoo-vae@champion"], project, env)
    assert samples.stat().st_size > 0
    compare = client.get_experiment_by_name("latentzoo-compare").experiment_id
    compared = {r.info.run_name: r.data.metrics for r in client.search_runs([compare])}
    assert set(compared) == set(families) and all("test_mse" in m for m in compared.values())

    git = ["git", "-c", "user.email=ci@latentzoo", "-c", "user.name=ci"]
    run([*git, "add", "-A"], project, env)
    run([*git, "commit", "-qm", "first run"], project, env)
    committed = run(["git", "ls-files"], project, env).stdout.split()
    for small in ("dvc.lock", "metrics/evaluate/vae.json", "plots/train/vae.csv", "tune/vae/best.yaml"):
        assert small in committed  # the small outputs live in git, so old revisions keep their results
    assert "reports/report.md" in committed and not any(f.startswith(("models/", "data/")) for f in committed)
    assert not any(
        f.startswith(("reports/images", "plots/evaluate", "mlflow", ".dvc/cache", ".venv")) for f in committed
    )

    # An experiment as the README runs one: queued, run by DVC's queue worker in a temporary copy of the project
    # against the same Ray, compared with the workspace, applied and committed (one: each costs a fine-tuning).
    run([DVC, "exp", "run", "--queue", "-S", "finetune.label_fraction=0.5"], project, env)
    run(["make", "-o", ".venv/.installed", "queue"], project, env)  # install done: make runs the queue only
    status = run([DVC, "queue", "status"], project, env).stdout
    assert status.count("Success") == 1, status
    rows = list(csv.DictReader(io.StringIO(run([DVC, "exp", "show", "--csv"], project, env).stdout)))
    fraction = next(c for c in rows[0] if c.endswith("finetune.label_fraction"))
    (queued,) = [r for r in rows if r[fraction] == "0.5"]
    assert all(float(queued[f"metrics/evaluate/{family}.json:test_mse"]) > 0 for family in FAMILIES)
    assert float(queued["metrics/finetune/stacked_ae.json:test_accuracy"]) > 0  # its own fine-tuning
    stacked = client.get_experiment_by_name("latentzoo-stacked_ae").experiment_id
    runs = client.search_runs([stacked], "params.`phase.label_fraction` = '0.5'")
    assert runs and all(r.info.status == "FINISHED" for r in runs)  # logged where the project's runs are
    pretrained = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["pretrain"]
    run([DVC, "exp", "apply", queued["Experiment"]], project, env)
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["pretrain"] == pretrained  # not re-run
    run([*git, "add", "-A"], project, env)
    run([*git, "commit", "-qm", "half the labels"], project, env)

    # What changed between the two commits, through dvc params/metrics diff.
    diff = run([str(VENV / "bin" / "latentzoo"), "compare", "HEAD~1"], project, env).stdout
    assert "HEAD~1 → workspace" in diff and "finetune.label_fraction: 1 → 0.5" in diff
    assert "metrics/finetune/stacked_ae.json  labelled_images: 1258 →" in diff
    metrics = run([DVC, "metrics", "diff", "HEAD~1", "--json"], project, env).stdout
    assert json.loads(metrics)["metrics/finetune/stacked_ae.json"]["labelled_images"]["old"] == 1258

    # A teammate's clone: the outputs come from a DVC remote, nothing is trained again.
    remote = project.parent / "dvc-remote"
    run([DVC, "remote", "add", "-d", "shared", str(remote)], project, env)
    run([*git, "commit", "-qam", "the team's remote"], project, env)
    run([DVC, "push"], project, env)
    clone = project.parent / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], project.parent, env)
    run([DVC, "pull"], clone, env)
    assert "up to date" in run([DVC, "status"], clone, env).stdout
    assert (clone / "metrics/finetune/stacked_ae.json").read_text() == (
        project / "metrics/finetune/stacked_ae.json"
    ).read_text()
    sample = ["sample", "--model", "models/vae", "-n", "4", "-o", "samples.png"]
    run([str(VENV / "bin" / "latentzoo"), *sample], clone, env)
    assert (clone / "samples.png").stat().st_size > 0


# ---------------------------------------------------------------- the MLflow UI a user opens


def page_text(url: str) -> str:
    """The text of a page after headless Chromium ran its JavaScript (the MLflow UI is a single-page app)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += ["--window-size=2000,2000", "--virtual-time-budget=30000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def shown(value: float) -> str:
    """A metric as the UI prints it: rounded to 3 decimals, JavaScript's number format."""
    text = repr(round(value, 3))
    return text.removesuffix(".0")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's)")
def test_the_mlflow_ui_shows_every_family_side_by_side(project: Path):
    """`make mlflow-ui` on the finished pipeline: the comparison experiment's runs page lists every family, and
    comparing those runs shows each family's test metrics side by side."""
    from mlflow.tracking import MlflowClient

    from latentzoo.local_cluster import free_port

    if not (project / "reports/report.md").exists():
        pytest.fail("the pipeline test did not finish: no MLflow runs to look at")
    port = free_port()
    make = ["make", "-o", ".venv/.installed", "mlflow-ui", f"MLFLOW_PORT={port}"]
    ui = subprocess.Popen(make, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", ui)
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("latentzoo-compare").experiment_id
        runs = client.search_runs([experiment], "tags.`latentzoo.stage` = 'compare'", max_results=len(FAMILIES))
        assert sorted(r.info.run_name for r in runs) == sorted(FAMILIES)

        listing = page_text(f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs")
        assert "latentzoo-compare" in listing and all(f" {family} " in listing for family in FAMILIES)

        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in runs]))
        compared = page_text(f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments=[%22{experiment}%22]")
        assert f"Comparing {len(FAMILIES)} Runs" in compared
        for r in runs:
            assert r.info.run_id in compared
            for key in ("test_mse",):  # the compare page lists the metrics the runs share
                assert key in compared and shown(r.data.metrics[key]) in compared, (key, r.info.run_name)
    finally:
        stop_mlflow_server(ui)
