"""benchmarks/run_all.py renders results.md from JSON files alone: the ratio rows of each speed benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LOADER = {
    "command": "python benchmarks/loader_speed.py --quick",
    "date": "2026-01-02T03:04:05",
    "smoke": True,
    "train_images": 1800,
    "batch_size": 64,
    "shards": 4,
    "rounds": 1,
    "pipeline_uses": "cached",
    "target_ratio": 0.8,
    "rows": {
        "tensordataset": {"images_per_s": 100000.0},
        "streamed": {"images_per_s": 20000.0, "ratio_vs_tensordataset": 0.2, "target": "FAIL"},
        "cached": {
            "images_per_s": 90000.0,
            "ratio_vs_tensordataset": 0.9,
            "target": "PASS",
            "first_epoch_images_per_s": 5000.0,
        },
    },
}
VAE = {
    "epochs": 3,
    "workers": 2,
    "global_batch_size": 128,
    "test_neg_elbo_nats": 99.5,
    "plain_pytorch_epoch_s": 20.0,
    "ray_train_epoch_s_steady": 31.5,
    "ray_startup_and_overhead_s": 24.0,
    "ray_1worker_train_epoch_s": 21.0,
    "ray_1worker_over_plain_epoch_ratio": 1.05,
    "torch_threads_per_worker": 1,
}
REPRO = {
    "target_s": 600.0,
    "target": "PASS",
    "noop_over_clean": 0.05,
    "clean": {"wall_s": 300.0, "returncode": 0, "stages_run": 3, "stage_s": {"prepare": 10.0, "train@vae": 250.0}},
    "noop": {"wall_s": 15.0, "returncode": 0, "stages_run": 0, "stage_s": {}, "up_to_date": True},
}


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("benchmarks_run_all", ROOT / "benchmarks/run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_report_renders_the_ratio_rows_from_json_only(run_all, tmp_path: Path):
    for name, result in {"loader_speed": LOADER, "vae_mnist": VAE, "repro_timing": REPRO, "mystery": {}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    report = run_all.write_report(tmp_path, tmp_path / "results.md").read_text()

    assert "| TensorDataset + DataLoader (shuffle; baseline) | 1.00× | 100,000 | – |" in report
    assert "| `train_batches`, streamed | 0.20× | 20,000 | FAIL |" in report
    assert "| `train_batches`, cached (the pipeline's) | 0.90× | 90,000 | PASS |" in report
    assert "`python benchmarks/loader_speed.py --quick`; 2026-01-02T03:04:05" in report
    assert "Smoke run" in report
    assert "| Ray Train, 1 worker | 1.05× | 21.0 |" in report
    assert "reported apart: 24.0 s" in report  # start-up outside the epoch ratio
    assert "| 2 | 1.50× | 31.5 | 1 |" in report  # 2 vs 1 workers, with torch threads per worker
    assert "| clean workspace | 1.00× | 0.50× | 300 | 3 | PASS |" in report
    assert "| no-op, right after | 0.05× | 0.03× | 15 | 0 | up to date |" in report
    assert "train@vae 250, prepare 10" in report
    assert "| 10 | 2 |" not in report and "| 3 | 2 | 99.5 |" in report  # the VAE's quality row
    assert "Not measured yet (no `vq_speed.json`)" in report
    assert "`mystery.json`: no table for it" in report


def test_a_file_missing_fields_does_not_break_the_report(run_all, tmp_path: Path):
    (tmp_path / "vq_speed.json").write_text(json.dumps({"machine": {"date": "2026-01-01"}}))
    (tmp_path / "tune_mnist.json").write_text("{not json")
    report = run_all.render_report(tmp_path)
    assert "Could not render this file (KeyError" in report
    assert "`tune_mnist.json`" in report and "unreadable" in report


def test_the_report_says_where_a_result_came_from_and_flags_it_when_its_code_changed(run_all, tmp_path: Path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_io

    record = results_io.provenance()
    assert record["commit"] and record["machine"]["cpus"] >= 1 and "torch" in record["versions"]
    assert "benchmarks/results_io.py" in record["sources"]  # the files loaded in this process
    fresh = {**LOADER, **record, "smoke": False}
    changed = {**fresh, "sources": {**record["sources"], "benchmarks/results_io.py": "0" * 64}}
    for name, result in (("loader_speed", fresh), ("repro_timing", changed), ("vae_mnist", VAE)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    report = run_all.render_report(tmp_path)
    assert f"commit {record['commit'][:12]}" in report and "CPUs" in report
    assert "**Stale: `benchmarks/results_io.py` changed since this was measured.**" in report
    assert report.count("Stale:") == 1 and "Freshness unknown" in report  # vae_mnist: no hashes recorded


def test_a_difference_is_called_only_when_the_intervals_do_not_overlap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_io import differs, mean_std, summary

    a, b, c = summary([1.0, 1.2, 1.1]), summary([1.15, 1.3, 1.25]), summary([2.0, 2.1, 1.9])
    assert a["n"] == 3 and abs(a["mean"] - 1.1) < 1e-12 and abs(a["std"] - 0.1) < 1e-12
    assert not differs(a, b) and differs(a, c) and differs(c, a)
    assert mean_std(a) == "1.10 ± 0.10 (n=3)" and mean_std(None) == "–"


def test_quality_tables_give_mean_and_std_over_seeds_and_call_a_difference_only_without_overlap(run_all, tmp_path):
    def stacked_run(seed: int, few: float, few_random: float) -> dict:
        return {
            "seed": seed,
            "by_fraction": {
                "0.01": {"test_accuracy": few, "test_accuracy_random": few_random, "labelled_images": 533},
                "1.0": {"test_accuracy": 0.985 + seed / 1000, "test_accuracy_random": 0.986 - seed / 1000},
            },
        }

    stacked = {
        "runs": [stacked_run(0, 0.90, 0.87), stacked_run(1, 0.91, 0.86), stacked_run(2, 0.90, 0.87)],
        "target_all_labels": {"accuracy": 0.987, "verdict": "FAIL"},
    }
    tune_run = {"metric": "val_mse", "default_weights": {"commitment_weight": 0.25}, "trials_per_hour": 100.0}
    tune = {
        "models": {
            "vqvae": {
                "runs": [
                    tune_run | {"tuned_weights": {"commitment_weight": w}, "test_default": d, "test_tuned": t}
                    for w, d, t in ((0.05, 1.0, 0.9), (0.06, 1.1, 0.95), (0.07, 1.05, 1.0))
                ]
            }
        }
    }
    for name, result in (("stacked_mnist", stacked), ("tune_mnist", tune)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    report = run_all.render_report(tmp_path)

    assert "| 1% (533) | 0.73× | 90.33 ± 0.58 (n=3) | 86.67 ± 0.58 (n=3) | better | – |" in report
    assert "| 100% | 0.93× | 98.60 ± 0.10 (n=3) | 98.50 ± 0.10 (n=3) | no difference | – |" in report  # touching
    assert "Target ≥ 98.7% with all labels (mean over seeds): FAIL." in report
    assert "commitment_weight 0.25 → 0.05 / 0.06 / 0.07" in report
    assert "| 1.05 ± 0.05 (n=3) | 0.95 ± 0.05 (n=3) | no difference |" in report  # intervals touch: not called


def test_the_vae_likelihood_table_judges_the_target_and_shows_the_learning_curve(run_all, tmp_path):
    def nll(values):
        return {"mean": sum(values) / len(values), "std": 0.1, "n": len(values), "values": values}

    curve = [{"epoch": 10, "neg_elbo": 92.0, "nll": 88.0}, {"epoch": 20, "neg_elbo": 90.0, "nll": 86.0}]
    result = {
        "machine": {"cpus": 2, "gpu": None},
        "device": "cpu",
        "k": 1000,
        "epochs": 20,
        "neg_elbo": nll([90.0, 90.0, 90.0]),
        "nll": nll([86.0, 86.0, 86.0]),
        "anchors": {"pythae VAE (k = 200)": 89.78},
        "curve": {"every": 10, "k": 100, "images": 1000},
        "rows": [{"seed": seed, "curve": curve} for seed in range(3)],
    }
    (tmp_path / "vae_nll.json").write_text(json.dumps(result))
    report = run_all.render_report(tmp_path)
    assert "| pythae VAE (k = 200) (published) | 89.78 | -3.78 |" in report
    assert "Target (#22): NLL ≤ 87.0 nats, k ≥ 1,000, ≥ 3 seeds, trained on CPU: PASS." in report
    assert "Learning curve (first 1000 test digits, k = 100):" in report
    assert "| 20 | 90.00 ± 0.00 (n=3) | 86.00 ± 0.00 (n=3) |" in report

    for changed in ({"k": 200}, {"device": "NVIDIA H200"}, {"nll": nll([87.5, 87.5, 87.5])}):
        (tmp_path / "vae_nll.json").write_text(json.dumps(result | changed))
        assert "trained on CPU: FAIL." in run_all.render_report(tmp_path), changed


def test_a_result_records_the_code_its_run_started_with(monkeypatch):
    """A benchmark that runs for hours across a commit records the commit and file hashes of its start."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_io

    start = {**results_io.AT_START, "commit": "abc123", "files": {"benchmarks/results_io.py": "1" * 64}}
    monkeypatch.setattr(results_io, "AT_START", start)
    record = results_io.provenance()
    assert record["commit"] == "abc123" and record["started"] == start["date"]
    assert record["sources"]["benchmarks/results_io.py"] == "1" * 64  # as at the start, not as now
    assert results_io.stale_sources(record) == ["benchmarks/results_io.py"]  # so results.md flags it


def test_a_result_records_the_params_sections_it_read(monkeypatch, tmp_path: Path):
    """A changed default in a section the benchmark read flags it stale; a change to another section does not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_io

    monkeypatch.setattr(results_io, "_PARAMS_READ", set())
    assert results_io.read_params("seed", "vae")["vae"]["beta"] == 1.0
    with pytest.raises(KeyError, match="params.yaml has no section nope"):
        results_io.read_params("nope")
    record = results_io.provenance()
    assert {"params.yaml:seed", "params.yaml:vae"} <= set(record["sources"]) and "params.yaml" not in record["sources"]
    root = tmp_path / "repo"
    for path in record["sources"]:
        if not path.startswith("params.yaml"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes((ROOT / path).read_bytes())
    config = (ROOT / "params.yaml").read_text()
    (root / "params.yaml").write_text(config.replace("num_samples: 2000", "num_samples: 10"))  # classifier: unread
    assert results_io.stale_sources(record, root) == []
    (root / "params.yaml").write_text(config.replace("\n  beta: 1.0", "\n  beta: 0.5"))
    assert results_io.stale_sources(record, root) == ["params.yaml:vae"]


def test_the_vq_table_shows_the_codes_used_after_each_epoch(run_all):
    def row(variant: str, seed: int, used: list[float]) -> dict:
        curve = [{"epoch": e, "utilisation": u, "perplexity": 1.0, "psnr": 20.0} for e, u in enumerate(used, 1)]
        return {
            "variant": variant,
            "codebook_size": 8192,
            "seed": seed,
            "epochs": len(used),
            **curve[-1],
            "curve": curve,
        }

    rows = [row("simvq", 0, [0.80, 0.86]), row("simvq", 1, [0.82, 0.88]), row("ema-restart", 0, [0.5, 0.6])]
    section = "\n".join(run_all.vq_curves(rows, ["simvq", "ema-restart"]))
    assert "Codes used after each epoch, K = 8,192:" in section
    assert "| 2 | 87.0 ± 1.4 (n=2) | 60.0 ± 0.0 (n=1) |" in section


def test_a_vae_nll_seed_stopped_after_an_epoch_resumes_to_the_same_weights(tmp_path: Path):
    """--workdir keeps each epoch's state (weights, optimizer, random streams): a resumed seed ends exactly where an
    uninterrupted one does, and a file from other settings is not taken up."""
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmarks_vae_nll", ROOT / "benchmarks/vae_nll.py")
    vae_nll = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = vae_nll  # its dataclass looks its module up there
    spec.loader.exec_module(vae_nll)
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    args = argparse.Namespace(epochs=3, batch_size=32, lr=1e-3, curve_every=0, device="cpu")
    cfg = vae_nll.VAEConfig()

    def run(keep):
        torch.manual_seed(0)
        model = vae_nll.VAE(cfg, (1, 28, 28))
        return model, vae_nll.train(model, images, images, args, 0, keep)

    straight, _ = run(None)
    keep = vae_nll.Kept(tmp_path, 0, {"epochs": 3})
    run(keep)  # leaves the state after epoch 2 (the last epoch's is the trained model's, saved by `trained`)
    assert torch.load(keep.path("partial"), weights_only=True)["epoch"] == 2
    resumed, _ = run(keep)  # trains epoch 3 only
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert vae_nll.Kept(tmp_path, 0, {"epochs": 4}).load("partial") is None


def test_vq_mnist_appends_only_to_rows_measured_with_the_same_code_and_settings(tmp_path: Path):
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmarks_vq_mnist", ROOT / "benchmarks/vq_mnist.py")
    vq_mnist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vq_mnist)
    import results_io

    args = argparse.Namespace(lr=2e-3, dim=32, seeds=[1], out="x")
    earlier = {**results_io.provenance(), "settings": {"lr": 2e-3, "dim": 32, "seeds": [0]}, "rows": [{"seed": 0}]}
    out = tmp_path / "vq_mnist.json"
    out.write_text(json.dumps(earlier))
    rows, runs = vq_mnist.kept_rows(out, args)
    assert rows == [{"seed": 0}]  # other seeds, same code and settings: kept
    assert runs[0]["command"] == earlier["command"]  # and the report names the run they came from
    assert vq_mnist.kept_rows(out, argparse.Namespace(lr=1e-3, dim=32, seeds=[1], out="x")) == ([], [])
    changed = {**earlier, "sources": {**earlier["sources"], "benchmarks/vq_mnist.py": "0" * 64}}
    out.write_text(json.dumps(changed))
    assert vq_mnist.kept_rows(out, argparse.Namespace(lr=2e-3, dim=32, seeds=[1], out="x")) == ([], [])


def test_simvq_codes_measures_ranks_and_where_the_unused_codes_lie(run_all, tmp_path: Path):
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmarks_simvq_codes", ROOT / "benchmarks/simvq_codes.py")
    codes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codes)

    assert codes.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert codes.effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(6))) == pytest.approx(1.0)

    args = argparse.Namespace(dim=4, chunk_size=16, device="cpu", lr=2e-3, batch_size=8, epochs=1)
    model = codes.build("simvq", 64, args, seed=0)
    images = torch.rand(24, 1, 28, 28)
    codes.train(model, images, images[:8], args, seed=0)
    found = codes.code_figures(model, images, chunk_size=16)
    assert 0 < found["used"] <= 1 and 1 <= found["w_rank"] <= 4 and 1 <= found["latent_rank"] <= 4
    assert len(found["unused_by_radius"]) == 10 and all(0 <= t <= 1 for t in found["unused_by_radius"])
    if found["used"] < 1:  # with 24 x 49 latents for 64 codes, some stay unused: they lie farther from the latents
        assert found["gap_unused"] > found["gap_used"]

    import results_io

    summaries = [
        {"codebook_size": 64, **{f: results_io.summary([found[f]]) for f in codes.FIGURES}}
        | {"unused_by_radius": [results_io.summary([t]) for t in found["unused_by_radius"]]}
    ]
    section = "\n".join(run_all.simvq_codes_section("simvq_codes", {"summary": summaries}))
    assert "K = 64, test split:" in section and "| effective rank of W |" in section
    assert section.count(" (n=1) |") >= 17  # 7 figures and 10 tenths
