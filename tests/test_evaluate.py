"""Evaluation and report without Ray: metrics in range, shard checks first, report table and images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from latentzoo.checkpoint import load_model, save_state, weights_record
from latentzoo.errors import ShardError
from latentzoo.evaluation.evaluate import evaluate_model
from latentzoo.evaluation.report import build_report
from latentzoo.models import build_model


@pytest.fixture
def untrained_vae(tmp_path, tiny_params) -> Path:
    params = tiny_params()
    torch.manual_seed(0)
    model = build_model("vae", params.vae, (1, 8, 8))
    path = tmp_path / "model.pt"
    save_state(path, weights_record(model, "vae", params.vae.model_dump(), (1, 8, 8), epoch=0))
    return path


def test_weights_file_round_trips_with_weights_only(untrained_vae):
    record = torch.load(untrained_vae, weights_only=True)
    assert record["model_name"] == "vae" and record["image_shape"] == [1, 8, 8]
    model, meta = load_model(untrained_vae)
    assert not model.training and meta["epoch"] == 0


def test_test_metrics_are_in_range(untrained_vae, digits_shards, tiny_params):
    result = evaluate_model(tiny_params(), untrained_vae, digits_shards, progress=False)
    assert result["test_images"] == 359
    assert result["test_neg_elbo"] > 0 and result["test_kl"] >= 0
    assert 0 < result["test_nll"] <= result["test_neg_elbo"] + 0.5  # the IWAE bound: tighter, up to noise
    assert result["test_binarized"] == 1 and result["test_nll_samples"] == tiny_params().evaluate.nll_samples
    assert 0 < result["test_mse"] < 1 and result["test_psnr"] > 0
    assert -1 <= result["test_ssim"] <= 1
    assert 0 <= result["test_active_units"] <= tiny_params().vae.latent_dim
    again = evaluate_model(tiny_params(), untrained_vae, digits_shards, progress=False)
    assert again == result  # seeded: the same binarisation and eps every time


def test_every_family_is_scored_on_its_deterministic_reconstruction_of_the_unmodified_image(
    untrained_vae, digits_shards, tiny_params
):
    from latentzoo.data.loader import eval_batches
    from latentzoo.data.shards import load_manifest, shard_urls

    result = evaluate_model(tiny_params(), untrained_vae, digits_shards, progress=False)
    model, _ = load_model(untrained_vae)
    urls = shard_urls(digits_shards, load_manifest(digits_shards), "test")
    with torch.no_grad():
        x = torch.cat([b for b, _ in eval_batches(urls, batch_size=512)])
        expected = (model.decode(model.posterior(x)[0]) - x).pow(2).mean().item()  # at mu(x), grey-level x
    assert result["test_mse"] == pytest.approx(expected, rel=1e-4)


def test_the_likelihood_is_switched_off_with_zero_samples(untrained_vae, digits_shards, tiny_params):
    result = evaluate_model(tiny_params(**{"evaluate.nll_samples": 0}), untrained_vae, digits_shards, progress=False)
    assert "test_nll" not in result and result["test_nll_samples"] == 0 and result["test_neg_elbo"] > 0


def test_test_mse_is_the_mean_over_test_images(digits_shards, tiny_params, tmp_path):
    """A family that reports its own batch "mse" metric must not have it counted twice."""
    from latentzoo.data.loader import eval_batches
    from latentzoo.data.shards import load_manifest, shard_urls

    params = tiny_params()
    torch.manual_seed(0)
    model = build_model("vqvae", params.vqvae, (1, 8, 8)).eval()
    path = tmp_path / "vq.pt"
    save_state(path, weights_record(model, "vqvae", params.vqvae.model_dump(), (1, 8, 8), epoch=0))
    result = evaluate_model(params, path, digits_shards, progress=False)
    urls = shard_urls(digits_shards, load_manifest(digits_shards), "test")
    with torch.no_grad():
        x = torch.cat([b for b, _ in eval_batches(urls, batch_size=512)])
        expected = (model(x).recon - x).pow(2).mean().item()
    assert result["test_mse"] == pytest.approx(expected, rel=1e-4)


def test_a_changed_test_shard_stops_evaluation(untrained_vae, digits_shards, tiny_params, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    tar = next(shards.glob("test-*.tar"))
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{tar.name}: sha256 mismatch"):
        evaluate_model(tiny_params(), untrained_vae, shards, progress=False)


def test_report_table_lists_every_model(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "train").mkdir()
    metrics = {
        "test_neg_elbo": 25.5,
        "test_nll": 24.25,
        "test_nll_samples": 200,
        "test_binarized": 1,
        "test_psnr": 14.0,
    }
    (tmp_path / "eval/vae.json").write_text(json.dumps(metrics))
    (tmp_path / "eval/resvae_gan.json").write_text(json.dumps({"test_neg_elbo": 60.0, "test_binarized": 0}))
    (tmp_path / "train/vae.json").write_text(json.dumps({"fit_time_s": 60.0, "epochs": 3}))
    (tmp_path / "plots/vae").mkdir(parents=True)
    (tmp_path / "plots/vae/samples.png").write_bytes(b"\x89PNG fake")
    report = build_report(
        ["vae", "resvae_gan", "other"], tmp_path / "eval", tmp_path / "train", tmp_path / "plots", tmp_path / "reports"
    )
    text = report.read_text()
    assert "| vae | – | 14 |" in text and "| other | – |" in text  # MSE, PSNR, ...
    assert "| vae | binarised (dynamic, one fixed draw) | 25.5 | 24.25 | 200 |" in text  # the likelihood table
    assert "| resvae_gan | grey levels (Bernoulli cross-entropy) | 60 | – |" in text
    assert "| other | binarised" not in text and "| other | grey" not in text
    assert (tmp_path / "reports/images/vae-samples.png").exists()
    assert "images/vae-samples.png" in text
    page = (tmp_path / "reports/report.html").read_text()
    assert "<td>24.25</td>" in page and "data:image/png;base64," in page and 'src="images/' not in page


def test_report_shows_the_stacked_autoencoder_side_by_side(tmp_path):
    stacked = {
        "finetune": {
            "test_accuracy": 0.981,
            "test_accuracy_random": 0.975,
            "test_accuracy_probe": 0.9,
            "label_fraction": 0.1,
            "labelled_images": 5400,
            "epochs": 20,
        },
        "pretrain": {
            "test_recon_mse_layer1": 0.01,
            "test_recon_mse_layer2": 0.2,
            "layers": [500, 500],
            "epochs_per_layer": 10,
        },
    }
    report = build_report(
        [], tmp_path / "eval", tmp_path / "train", tmp_path / "plots", tmp_path / "reports", stacked=stacked
    )
    text = report.read_text()
    assert "| pretrained + fine-tuned | 0.981 |" in text and "| random init | 0.975 |" in text
    assert "| linear probe (frozen pretrained features) | 0.9 |" in text and "(5400 images)" in text
    assert "| 1 | 0.01 |" in text and "| 2 | 0.2 |" in text
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["stacked_ae"] == stacked


def test_report_draws_the_training_curves(tmp_path):
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves/vae.csv").write_text("epoch,train_loss,val_loss\n1,40,38\n2,30,29\n")
    (tmp_path / "curves/resvae_gan.csv").write_text(
        "epoch,train_loss,val_loss,train_disc_loss\n1,50,48,\n2,45,44,1.9\n"
    )
    report = build_report(
        ["vae", "resvae_gan", "absent"],
        tmp_path / "eval",
        tmp_path / "train",
        tmp_path / "plots",
        tmp_path / "reports",
        curves_dir=tmp_path / "curves",
    )
    png = tmp_path / "reports/images/training_curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "![training curves](images/training_curves.png)" in report.read_text()
    assert report.read_text().index("## Training curves") > report.read_text().index("| model |")
