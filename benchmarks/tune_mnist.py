"""Tuned against default loss weights on MNIST: the tune stage's search, then the same training budget with the
default and with the best weights, both scored by the model's objective on the held-out test split.

    .venv/bin/python benchmarks/tune_mnist.py --models vae vqvae --train-images 20000 --trials 16 --seeds 0 1 2

For each seed (the search's sampler, the trainings' weights and noise; the data split is params.yaml's) and model:
the search's wall time, the trials run / stopped early by ASHA / errored, seconds per trial and
per trial-epoch, trials per hour on this machine, and the objective (VAE: negative ELBO in nats, VQ-VAE: MSE)
before (params.yaml's weights) and after (the best trial's), on the val split at the end of the search and on the
test split after a fresh training of `--final-epochs` with each. The report gives each figure as mean ± std over
the seeds and calls tuned better or worse than default only when the intervals do not overlap. Writes
benchmarks/results/tune_mnist.json (or --out).
Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from results_io import PIPELINE_SECTIONS, read_params, write_result

ROOT = Path(__file__).resolve().parents[1]
TEST_METRIC = {"val_neg_elbo": "test_neg_elbo", "val_mse": "test_mse"}


def params_for(args, workdir: Path, seed: int | None = None):
    from latentzoo.config import validate_params

    raw = read_params(*PIPELINE_SECTIONS, "tune", *args.models)
    if seed is not None:
        raw["seed"] = seed
    raw["data"].update(source="idx", path=str(Path(args.data).resolve()), limit=args.train_images)
    raw["shard"]["maxcount"] = max(100, min(5000, args.train_images // 8))  # several shards per worker
    raw["train"].update(num_workers=2, epochs=args.final_epochs, batch_size=64)
    raw["tune"].update(num_samples=args.trials, epochs=args.epochs, cpus_per_trial=1)
    raw["evaluate"]["nll_samples"] = 0  # the objective is -ELBO; k = 200 importance samples would cost ~4 min a score
    raw["tracking"]["enabled"] = False
    raw["ray"].update(storage_path=str(workdir / "ray"), num_cpus=os.cpu_count())
    return validate_params(raw)


def trial_times(experiment: Path) -> list[dict]:
    """Each trial's last reported row (Tune's result.json): epochs run and seconds in the trial."""
    rows = []
    for result in sorted(experiment.glob("*/result.json")):
        lines = result.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            rows.append({"epochs": last["training_iteration"], "seconds": last["time_total_s"]})
    return rows


def test_objective(params, model: str, shards: Path, work: Path, tag: str, weights: dict) -> float:
    """Train `model` with `weights` for train.epochs (2 DDP workers), score it on the test split."""
    from latentzoo.stages.evaluate import evaluate_stage
    from latentzoo.training.trainer import TrainOutputs, train_model
    from latentzoo.tuning.search import with_weights

    tuned = with_weights(params, model, weights)
    out = TrainOutputs(work / tag / "model", work / tag / "train.json", work / tag / "train.csv")
    train_model(tuned, model, shards, out, root=work / tag)
    metric = TEST_METRIC[params.model_config_for(model).tune_metric]
    return evaluate_stage(tuned, out.model_dir, shards, work / tag / "test.json", work / tag / "plots")[metric]


def bench_model(params, model: str, shards: Path, work: Path) -> dict:
    """One seed's search for `model`, then its default and tuned weights trained and scored on the test split."""
    from latentzoo.stages.tune import tune_stage
    from latentzoo.tuning.search import search_space

    section = params.model_config_for(model)
    default = {key: getattr(section, key) for key in search_space(params, model)}
    start = time.perf_counter()
    best = tune_stage(params, model, shards, work / f"tune-{model}.yaml")
    search_s = time.perf_counter() - start
    trials = trial_times(Path(best["experiment"]))
    trial_epochs = sum(t["epochs"] for t in trials)
    before = test_objective(params, model, shards, work, f"{model}-default", default)
    after = test_objective(params, model, shards, work, f"{model}-tuned", best["weights"])
    return {
        "metric": best["metric"],
        "default_weights": default,
        "tuned_weights": best["weights"],
        "search_wall_s": search_s,
        "trials": best["trials"],
        "trial_epochs_run": trial_epochs,
        "seconds_per_trial": sum(t["seconds"] for t in trials) / len(trials),
        "seconds_per_trial_epoch": sum(t["seconds"] for t in trials) / max(trial_epochs, 1),
        "trials_per_hour": 3600 * len(trials) / search_s,
        "best_trial_val": best["best_value"],
        "test_default": before,
        "test_tuned": after,
        "test_tuned_over_default": after / before,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--models", nargs="+", default=["vae", "vqvae"])
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per trial (ASHA's max_t)")
    ap.add_argument("--final-epochs", type=int, default=5, help="epochs of the default and tuned trainings")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage

    result = {
        "train_images": args.train_images,
        "trials": args.trials,
        "epochs_per_trial": args.epochs,
        "final_epochs": args.final_epochs,
        "seeds": args.seeds,
        "cpus": os.cpu_count(),
        "models": {model: {"runs": []} for model in args.models},
    }
    with tempfile.TemporaryDirectory(prefix="lz-tune-") as d:
        work = Path(d)
        params = params_for(args, work)
        prepare_stage(params, work / "prepared")
        shard_stage(params, work / "prepared", work / "shards")
        for seed in args.seeds:
            seed_work = work / f"seed{seed}"  # its own Ray storage, so no search resumes another seed's
            for model in args.models:
                run = bench_model(params_for(args, seed_work, seed), model, work / "shards", seed_work) | {"seed": seed}
                result["models"][model]["runs"].append(run)
                print(json.dumps({model: run}, indent=2), flush=True)

    write_result("tune_mnist", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
