"""Residual-VAE + PatchGAN on MNIST against the plain VAE with equal epochs, and its ablations: without the GAN,
without the variance regulariser, with the standard per-sample KL. Every variant is trained by the pipeline's
train stage (Ray Train DDP) and scored by its evaluate stage against the classifier stage's feature network:
Fréchet classifier distance (FCD) of prior samples and of reconstructions, sharpness relative to the test images
(variance of the Laplacian; data = 1), MSE, -ELBO, mean posterior sigma and collapsed latent dims.

    .venv/bin/python benchmarks/resvae_mnist.py --data ../shared/data/mnist --train-images 10000 --epochs 8

Prints the figures and writes benchmarks/results/resvae_mnist.json. Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results_io import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]

# variant → (family, overrides of its params.yaml section). The defaults: a dense 16-d latent, the mixture's mean
# and whole covariance pulled to N(0, I), the critic judging reconstructions and decoded prior samples.
SPATIAL = {"latent_dim": 0, "moments": "diagonal", "adversarial_samples": False}  # the first design: 4x7x7 latent
VARIANTS = {
    "vae": ("vae", {}),
    "resvae_gan": ("resvae_gan", {}),
    "no_gan": ("resvae_gan", {"adversarial_weight": 0.0}),
    "no_variance_reg": ("resvae_gan", {"variance_weight": 0.0}),
    "standard_kl": ("resvae_gan", {"posterior": "standard"}),
    # what led to the defaults
    "critic_on_recon_only": ("resvae_gan", {"adversarial_samples": False}),
    "critic_on_recon_only_start_100": ("resvae_gan", {"adversarial_samples": False, "disc_start": 100}),
    "critic_on_recon_only_adv_002": ("resvae_gan", {"adversarial_samples": False, "adversarial_weight": 0.02}),
    "critic_start_100": ("resvae_gan", {"disc_start": 100}),
    "diagonal_moments_recon_only": ("resvae_gan", {"moments": "diagonal", "adversarial_samples": False}),
    "latent_32_recon_only": ("resvae_gan", {"latent_dim": 32, "adversarial_samples": False}),
    "spatial": ("resvae_gan", SPATIAL),
    "spatial_no_gan": ("resvae_gan", SPATIAL | {"adversarial_weight": 0.0}),
    "spatial_no_variance_reg": ("resvae_gan", SPATIAL | {"variance_weight": 0.0}),
    "spatial_standard_kl": ("resvae_gan", SPATIAL | {"posterior": "standard"}),
    "spatial_1x7x7": ("resvae_gan", SPATIAL | {"latent_channels": 1}),
}
REPORTED = (
    "test_fid_samples",
    "test_fid_recon",
    "test_kid_samples",
    "test_precision",
    "test_recall",
    "test_sharpness_samples",
    "test_sharpness_recon",
    "test_mse",
    "test_neg_elbo",
    "test_mean_sigma",
    "test_collapsed_dims",
    "test_active_units",
)


def params_for(args, workdir: Path, family: str, overrides: dict):
    from latentzoo.config import validate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"] = [family]
    raw["data"].update(source="idx", path=str(Path(args.data).resolve()), limit=args.train_images)
    raw["shard"]["maxcount"] = 5000
    raw["train"].update(
        num_workers=args.workers,
        epochs=args.epochs,
        batch_size=args.batch_size // args.workers,
        lr=args.lr,
        use_gpu=args.gpu,
    )
    raw["resvae_gan"].update(width=args.width, disc_width=args.width, disc_start=args.disc_start)
    raw[family].update(overrides)
    raw["classifier"].update(epochs=args.classifier_epochs, num_samples=args.samples)
    raw["tracking"]["enabled"] = False
    raw["ray"].update(storage_path=str(workdir / "ray"), num_cpus=os.cpu_count())
    return validate_params(raw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--train-images", type=int, default=10000, help="first N training images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16, help="resvae_gan.width and disc_width")
    ap.add_argument("--disc-start", type=int, default=300, help="optimizer steps before the critic starts")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--classifier-epochs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=5000, help="images per FCD")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--update", action="store_true", help="add these variants to the existing results file")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data, models and Ray runs here")
    args = ap.parse_args()

    from latentzoo.stages.classifier import classifier_stage
    from latentzoo.stages.evaluate import evaluate_stage
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage
    from latentzoo.training.trainer import TrainOutputs, train_model

    result = {k: v for k, v in vars(args).items() if k not in ("data", "workdir")}
    result |= {"cpus": os.cpu_count(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="lz-resvae-") as d:
        work = args.workdir.resolve() if args.workdir else Path(d)
        base = params_for(args, work, "vae", {})
        prepare_stage(base, work / "prepared")
        shard_stage(base, work / "prepared", work / "shards")
        result["classifier"] = classifier_stage(base, work / "shards", work / "classifier", work / "classifier.json")
        for name in args.variants:
            family, overrides = VARIANTS[name]
            params = params_for(args, work, family, overrides)
            out = TrainOutputs(work / name, work / f"{name}-train.json", work / f"{name}-train.csv")
            start = time.perf_counter()
            final = train_model(params, family, work / "shards", out, root=work)
            wall = time.perf_counter() - start
            test = evaluate_stage(
                params,
                out.model_dir,
                work / "shards",
                work / f"{name}-test.json",
                work / f"{name}-plots",
                classifier=work / "classifier/model.pt",
            )
            row = {k: test[k] for k in REPORTED if k in test}
            row |= {"train_wall_s": wall, "fit_time_s": final["fit_time_s"], "overrides": overrides}
            result["variants"][name] = row
            print(json.dumps({name: row}, indent=2), flush=True)

    previous = RESULTS / "resvae_mnist.json"
    if args.update and previous.exists():  # keep the variants measured before (same settings assumed)
        result["variants"] = json.loads(previous.read_text())["variants"] | result["variants"]
    rows = result["variants"]
    if {"vae", "resvae_gan"} <= set(rows):
        full, vae = rows["resvae_gan"], rows["vae"]
        result["fid_samples_ratio_resvae_gan_over_vae"] = full["test_fid_samples"] / vae["test_fid_samples"]
        result["sharpness_gap_resvae_gan"] = abs(1 - full["test_sharpness_samples"])
        result["sharpness_gap_vae"] = abs(1 - vae["test_sharpness_samples"])
    write_result("resvae_mnist", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
