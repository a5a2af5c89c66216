"""Ray Train DDP end to end on tiny digits: equal steps with uneven shards, checkpoints, resume after a failure."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from latentzoo import faults
from latentzoo.checkpoint import load_model
from latentzoo.data.cache import bases
from latentzoo.errors import ShardError
from latentzoo.models import build_model
from latentzoo.models.vae import VAEConfig
from latentzoo.training.job import training_data
from latentzoo.training.loop import seed_stream
from latentzoo.training.trainer import TrainOutputs, run_name, train_model

pytestmark = pytest.mark.ray


def outputs(tmp_path, model="vae") -> TrainOutputs:
    return TrainOutputs(tmp_path / f"models/{model}", tmp_path / "metrics/train.json", tmp_path / "plots/train.csv")


def read_csv(path) -> list[dict[str, float]]:
    header, *rows = (line.split(",") for line in path.read_text().splitlines())
    return [dict(zip(header, map(float, row))) for row in rows]


def test_two_workers_with_uneven_shards(ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_uri):
    params = tiny_params(**{"train.num_workers": 2, "train.epochs": 3, "ray.storage_path": str(tmp_path / "ray")})
    out = outputs(tmp_path)
    final = train_model(params, "vae", digits_shards, out, root=tmp_path)

    assert final["epochs"] == 3
    assert final["steps_min"] == final["steps_max"] == 20  # ceil(1258 / (2 * 32)) on both ranks
    rows = out.plots_file.read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 4
    losses = [float(r.split(",")[rows[0].split(",").index("train_loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # it learns
    assert json.loads(out.metrics_file.read_text())["val_neg_elbo"] > 0
    model, meta = load_model(out.model_dir / "model.pt")  # weights_only=True inside
    assert meta["model_name"] == "vae" and meta["epoch"] == 3
    assert model(torch.rand(2, 1, 8, 8)).recon.shape == (2, 1, 8, 8)
    assert (out.model_dir / "reconstructions.png").exists() and (out.model_dir / "samples.png").exists()
    node = training_data(params, "vae", digits_shards).cache  # the digits fit train.cache_mb: decoded once per node
    assert node is not None and not [b for b in bases() if (b / node.name).exists()]  # and removed after the run

    params = params.updated(**{"ray.storage_path": str(tmp_path / "ray-again")})  # a second run, same seed
    again = outputs(tmp_path / "again")
    train_model(params, "vae", digits_shards, again, root=tmp_path)
    timings = ("train_time_s", "epoch_time_s", "data_wait_s")
    runs = [[{k: v for k, v in r.items() if k not in timings} for r in read_csv(o.plots_file)] for o in (out, again)]
    assert runs[0] == runs[1]  # every loss and metric of every epoch, to the last bit

    from mlflow.tracking import MlflowClient

    run_id = json.loads((out.model_dir / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["latentzoo.data_manifest_sha256"]
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2, 3]
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run_id)}
    assert {"images", "checkpoint", "config"} <= artifacts


def test_two_workers_keep_one_codebook(ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_uri):
    """EMA statistics, k-means init and dead-code restarts are all-reduced or broadcast: after every epoch the
    two ranks' weights and buffers hash the same, and the epoch's codebook usage is logged."""
    params = tiny_params(
        **{
            "train.num_workers": 2,
            "train.epochs": 3,
            "vqvae.ema": True,
            "vqvae.restart_after": 2,
            "vqvae.kmeans_init": True,
            "ray.storage_path": str(tmp_path / "ray"),
        }
    )
    out = outputs(tmp_path, "vqvae")
    final = train_model(params, "vqvae", digits_shards, out, root=tmp_path)

    rows = read_csv(out.plots_file)
    assert [r["replicas_in_sync"] for r in rows] == [1.0, 1.0, 1.0]
    assert rows[-1]["train_loss_recon"] < rows[0]["train_loss_recon"]
    for row in rows:
        assert 0 < row["val_utilisation"] <= 1 and 1 <= row["val_perplexity"] <= 64
        assert row["train_dead_codes"] == 64 * (1 - row["train_utilisation"])
    assert final["val_utilisation"] > 0.5  # restarts keep the small codebook in use
    model, meta = load_model(out.model_dir / "model.pt")
    assert meta["model_name"] == "vqvae" and bool(model.quantizer.initted)
    assert model(torch.rand(2, 1, 8, 8)).codes.shape == (2, 2, 2)

    from mlflow.tracking import MlflowClient

    from latentzoo.stages.evaluate import evaluate_stage

    test = evaluate_stage(params, out.model_dir, digits_shards, tmp_path / "test.json", tmp_path / "plots/vqvae")
    assert 0 < test["test_utilisation"] <= 1 and test["test_perplexity"] >= 1 and test["test_psnr"] > 5
    assert (tmp_path / "plots/vqvae/codebook_usage.png").exists()
    run_id = json.loads((out.model_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(mlflow_uri)
    assert "val_utilisation" in client.get_run(run_id).data.metrics
    assert "evaluation/codebook_usage.png" in {a.path for a in client.list_artifacts(run_id, "evaluation")}


def test_failure_mid_training_resumes_from_checkpoint(
    ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_uri, monkeypatch
):
    monkeypatch.setenv(faults.ENV, "train.epoch=1")
    params = tiny_params(
        **{
            "train.num_workers": 2,
            "train.epochs": 3,
            "train.max_failures": 1,
            "ray.storage_path": f"file://{tmp_path}/ray",
        }
    )  # a URI
    out = outputs(tmp_path)
    final = train_model(params, "vae", digits_shards, out, root=tmp_path)

    epochs = [int(r.split(",")[0]) for r in out.plots_file.read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]  # none lost, none repeated
    assert final["epochs"] == 3
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out.model_dir / "mlflow_run.json").read_text())["run_id"]
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3]
    kept = [p for p in (tmp_path / "ray").glob("vae-*/checkpoint_*") if p.is_dir()]
    assert len(kept) == 2  # checkpoints_to_keep, written through the file:// URI


def test_failures_past_the_limit_are_a_clear_error(
    ray_cluster, digits_shards, tiny_params, tmp_path, mlflow_uri, monkeypatch
):
    from latentzoo.errors import TrainingError

    monkeypatch.setenv(faults.ENV, "train.epoch=1")
    params = tiny_params(**{"train.num_workers": 1, "train.max_failures": 0, "ray.storage_path": str(tmp_path / "ray")})
    with pytest.raises(TrainingError, match="failed after 0 retries.*run the stage again to resume"):
        train_model(params, "vae", digits_shards, outputs(tmp_path), root=tmp_path)
    assert not (tmp_path / "models/vae").exists()  # nothing half-written under the final name


def test_a_full_disk_while_writing_checkpoints_is_one_line(ray_cluster, digits_shards, tiny_params, tmp_path):
    """Ray's storage on a real 64 KiB filesystem that the first checkpoints fill: a DiskFullError naming the run's
    folder and the fix, not Ray's traceback; nothing under the outputs."""
    from test_bad_input import small_filesystem

    from latentzoo.errors import DiskFullError

    with small_filesystem(tmp_path / "small") as small:
        if small is None:
            pytest.skip("no filesystem can be mounted here (not root): tests/test_bad_input.py injects ENOSPC")
        storage = small / "ray"
        untracked = {"train.num_workers": 1, "train.max_failures": 0, "tracking.enabled": False}
        params = tiny_params(**untracked, **{"ray.storage_path": str(storage)})
        full = rf"{storage}/\S+: no space left on device while training wrote its checkpoints \(.*set ray\.storage_path"
        with pytest.raises(DiskFullError, match=full):
            train_model(params, "vae", digits_shards, outputs(tmp_path), root=tmp_path)
    assert not (tmp_path / "models").exists()


def test_shard_problems_are_caught_before_ray_starts(digits_shards, tiny_params, tmp_path):
    params = tiny_params(**{"train.num_workers": 5})
    with pytest.raises(ShardError, match="3 shard\\(s\\) but train.num_workers is 5"):
        train_model(params, "vae", digits_shards, outputs(tmp_path), root=tmp_path)


def test_run_name_changes_with_params_not_with_retries(tiny_params):
    a = run_name("vae", tiny_params(), "sha")
    assert a == run_name("vae", tiny_params(**{"train.max_failures": 5}), "sha")
    assert a != run_name("vae", tiny_params(**{"train.lr": 0.1}), "sha")
    assert a != run_name("vae", tiny_params(), "other-data")


def test_mlflow_failure_during_training_is_reported_not_fatal(tmp_path, capsys):
    from latentzoo.config import TrainConfig
    from latentzoo.models.vae import VAEConfig
    from latentzoo.tracking.runs import TrackedRun
    from latentzoo.training.job import TrainJob
    from latentzoo.training.loop import EpochLogger, log_epoch

    job = TrainJob(
        model_name="vae",
        seed=0,
        train=TrainConfig(),
        model_config=VAEConfig(),
        train_urls=[],
        val_urls=[],
        num_train=0,
        image_shape=(1, 8, 8),
        run=TrackedRun(f"sqlite:///{tmp_path}/missing/dir/mlflow.db", "nope"),
    )
    assert TrainJob(**job.to_config()) == job  # what a Ray Train worker rebuilds, the TrackedRun included
    log_epoch(job.run, job.tag, {"epoch": 3, "train_loss": 1.0})  # a tune trial's rank 0
    assert "[vae] warning: MLflow logging of epoch 3 failed" in capsys.readouterr().out
    EpochLogger(job.run, job.tag).after_report(None, [{"epoch": 4, "train_loss": 1.0}], checkpoint=object())
    assert "[vae] warning: MLflow logging of epoch 4 failed" in capsys.readouterr().out  # the train stage's controller


def test_cosine_schedule_depends_on_the_epoch_alone():
    from latentzoo.training.loop import lr_at

    assert [lr_at(e, 4, 1.0, "constant") for e in range(4)] == [1.0] * 4
    cosine = [lr_at(e, 4, 1.0, "cosine") for e in range(4)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine == sorted(cosine, reverse=True)
    assert cosine[-1] > 0  # the last epoch still learns


def forward_on_each_rank(rank: int, world: int, port: int, seed: int, out_dir: str) -> None:
    """One DDP process (gloo): the same VAE weights on every rank, then one training forward pass of the same
    images after the loop's per-rank seeding; saves this rank's reconstructions."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(seed)  # as run_loop: identical initial weights
    model = DDP(build_model("vae", VAEConfig(latent_dim=4, hidden_channels=8, fc_hidden=32), (1, 8, 8)))
    seed_stream(seed, rank, epoch=0)
    out = model(torch.full((4, 1, 8, 8), 0.5))  # ε and the binarisation come from the global generator
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"recon": out.recon.detach(), "weights": weights}, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def two_rank_forward(seed: int, out_dir: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir.mkdir()
    torch.multiprocessing.spawn(forward_on_each_rank, args=(2, port, seed, str(out_dir)), nprocs=2)
    return [torch.load(out_dir / f"{rank}.pt") for rank in range(2)]


def test_ranks_draw_different_noise_from_the_same_weights_reproducibly(tmp_path):
    first, second = two_rank_forward(7, tmp_path / "a")
    assert torch.equal(first["weights"], second["weights"])  # the same model on both ranks
    assert not torch.allclose(first["recon"], second["recon"])  # the same images, different ε and binarisation
    again = two_rank_forward(7, tmp_path / "b")
    assert all(torch.equal(a["recon"], b["recon"]) for a, b in zip((first, second), again))  # same seed, same noise


def test_ray_trains_sigint_handler_ends_the_stage_as_interrupted():
    """Ray Train's SIGINT handler aborts the run and exits 0 from inside fit, and stays installed afterwards;
    `fit_interruptibly` turns that exit into a KeyboardInterrupt (exit 130) and puts the previous handler back.
    (Measured on a real stage: Ctrl-C after 3 of 8 epochs, exit 130, the rerun resumed from epoch 3.)"""
    import signal
    import sys

    from latentzoo.training.trainer import fit_interruptibly

    class RayTrainLike:
        def fit(self):
            signal.signal(signal.SIGINT, lambda *a: sys.exit(0))  # what DataParallelTrainer.fit leaves behind
            signal.raise_signal(signal.SIGINT)  # Ctrl-C mid-fit

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit_interruptibly(RayTrainLike())
    assert signal.getsignal(signal.SIGINT) is before
