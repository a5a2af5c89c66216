"""Greedy layer-wise pretraining and fine-tuning through Ray Train on the bundled digits (tiny stack)."""

from __future__ import annotations

import json

import pytest
import torch

from latentzoo import faults
from latentzoo.checkpoint import load_model, load_state
from latentzoo.training.layerwise import finetune_stack, pretrain_stack

STACK = {
    "stacked_ae.layers": [32, 16],
    "stacked_ae.pretrain_epochs": 2,
    "stacked_ae.pretrain_lr": 0.003,
    "finetune.epochs": 3,
    "finetune.lr": 0.01,
    "train.num_workers": 2,
}


@pytest.fixture(scope="module")
def pretrained(ray_cluster, digits_shards, tmp_path_factory):
    """The pretrain stage's output on the digits, shared by the tests below (tracking on, in its own store)."""
    from conftest import TINY, make_params

    work = tmp_path_factory.mktemp("stack")
    params = make_params(**{**TINY, **STACK, "ray.storage_path": str(work / "ray")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        done = pretrain_stack(params, digits_shards, work / "pretrained", root=work)
    return work, params, done


def test_pretraining_trains_one_layer_per_run_and_freezes_the_ones_below(pretrained):
    work, params, done = pretrained
    layer1 = load_state(work / "pretrained/layer-1/model.pt")["state_dict"]
    stack = load_state(work / "pretrained/model.pt")["state_dict"]
    for name in ("encoders.0.0.weight", "encoders.0.0.bias", "decoders.0.weight"):
        assert torch.equal(layer1[name], stack[name])  # layer 2's run left layer 1 exactly as it was
    assert not torch.equal(layer1["encoders.1.0.weight"], stack["encoders.1.0.weight"])
    metrics = done["metrics"]
    assert 0 < metrics["test_recon_mse_layer1"] < 0.2 and metrics["test_recon_mse_layer2"] > 0
    assert [(r["layer"], r["epoch"]) for r in done["rows"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    first, last = done["rows"][0]["val_recon_mse"], done["rows"][1]["val_recon_mse"]
    assert last < first  # layer 1's reconstruction error falls

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("latentzoo-stacked_ae").experiment_id)
    parent = next(r for r in runs if r.info.run_name == "pretrain-stacked_ae")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"layer-1", "layer-2"}
    history = client.get_metric_history(children["layer-2"].info.run_id, "val_recon_mse")
    assert [m.step for m in history] == [1, 2]  # per-layer, per-epoch reconstruction loss


def test_fine_tuning_beats_chance_beside_baseline_and_probe(pretrained, digits_shards, tmp_path, monkeypatch):
    """The three fine-tunings in Ray Train's local mode, in this process (a frozen layer under DDP: the pretraining
    above, on 2 workers; the finetune stage on 2 workers: tests/test_pipeline.py)."""
    work, params, _ = pretrained
    params = params.updated(**{"train.num_workers": 0})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = finetune_stack(params, work / "pretrained", digits_shards, tmp_path / "finetuned", root=tmp_path)
    metrics = done["metrics"]
    assert metrics["test_accuracy"] > 0.4  # 10 classes: chance is 0.1
    assert 0.1 < metrics["test_accuracy_random"] <= 1 and 0.1 < metrics["test_accuracy_probe"] <= 1
    assert set(done["curves"]) == {"pretrained", "random", "probe"}
    assert all(len(c) == 3 for c in done["curves"].values())
    probe, _ = load_model(tmp_path / "finetuned/probe/model.pt")
    stack, _ = load_model(work / "pretrained/model.pt")
    assert torch.equal(probe.encoders[0][0].weight, stack.encoders[0][0].weight)  # the probe froze the features


def test_fine_tuning_with_a_label_budget_resumes_after_a_failure(pretrained, digits_shards, tmp_path, monkeypatch):
    work, params, _ = pretrained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(faults.ENV, "train.epoch=1")
    params = params.model_copy(
        update={
            "finetune": params.finetune.model_copy(update={"label_fraction": 0.3, "baseline": False, "probe": False}),
            "train": params.train.model_copy(update={"max_failures": 1}),
        }
    )
    done = finetune_stack(params, work / "pretrained", digits_shards, tmp_path / "finetuned", root=tmp_path)
    rows = (tmp_path / "finetuned/pretrained.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]  # resumed from epoch 1's checkpoint, none repeated
    assert 300 < done["metrics"]["labelled_images"] < 460  # 30% of 1,258
    assert done["metrics"]["test_accuracy"] > 0.15  # 18 steps on ~380 labelled images; chance is 0.1
    run = json.loads((tmp_path / "finetuned/pretrained/mlflow_run.json").read_text())
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(run["tracking_uri"]).get_metric_history(run["run_id"], "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]
