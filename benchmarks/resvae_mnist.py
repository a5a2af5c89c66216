"""Residual-VAE + PatchGAN on MNIST against the plain VAE with equal epochs, and the ablations that test the paper's
claims (arXiv 2309.13160), over several seeds: without the GAN, without the variance regulariser, with the standard
per-sample KL instead of the mixture posterior. Every variant is trained by the pipeline's train stage (Ray Train
DDP) and scored by its evaluate stage against the classifier stage's feature network: Fréchet distance on the
classifier's features (FID) of prior samples and of reconstructions, sharpness relative to the test images
(variance of the Laplacian; data = 1), MSE, -ELBO, mean posterior sigma and collapsed latent dims.

    .venv/bin/python benchmarks/resvae_mnist.py --data ../shared/data/mnist --seeds 0 1 2   # 10,000 images, 8 epochs

The data split and the classifier are made once (params.yaml's seed); each seed sets the variants' initial weights
and every random draw of their training and evaluation. Each figure is reported as mean ± standard deviation over
the seeds, and each claim is called only when the two intervals do not overlap (`results_io.differs`).
Prints the figures and writes benchmarks/results/resvae_mnist.json (or --out). Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from results_io import PIPELINE_SECTIONS, differs, read_params, summary, write_result

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
# The paper's claims as (claim, variant, baseline, figure, which is better); each holds when the variant's interval
# lies on the better side of the baseline's without overlapping.
CLAIMS = [
    ("prior samples closer to the data than the plain VAE's", "resvae_gan", "vae", "test_fid_samples", "lower"),
    ("prior samples sharper than the plain VAE's", "resvae_gan", "vae", "test_sharpness_samples", "higher"),
    ("the critic makes prior samples closer to the data", "resvae_gan", "no_gan", "test_fid_samples", "lower"),
    ("the critic makes prior samples sharper", "resvae_gan", "no_gan", "test_sharpness_samples", "higher"),
    (
        "the variance regulariser prevents collapsed dimensions",
        "resvae_gan",
        "no_variance_reg",
        "test_collapsed_dims",
        "lower",
    ),
    (
        "the mixture posterior gives closer prior samples than the standard KL",
        "resvae_gan",
        "standard_kl",
        "test_fid_samples",
        "lower",
    ),
    (
        "the mixture posterior gives a tighter -ELBO than the standard KL",
        "resvae_gan",
        "standard_kl",
        "test_neg_elbo",
        "lower",
    ),
]
CLAIM_VARIANTS = ["vae", "resvae_gan", "no_gan", "no_variance_reg", "standard_kl"]
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


def params_for(args, workdir: Path, family: str, overrides: dict, seed: int | None = None):
    from latentzoo.config import validate_params

    raw = read_params(*PIPELINE_SECTIONS, "vae", "resvae_gan", "classifier")
    if seed is not None:
        raw["seed"] = seed
    raw["models"] = [family]
    raw["data"].update(source="idx", path=str(Path(args.data).resolve()), limit=args.train_images)
    raw["shard"]["maxcount"] = max(100, min(5000, args.train_images // (4 * args.workers)))  # shards for every worker
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
    raw["evaluate"]["nll_samples"] = (
        0  # no claim is about the likelihood (vae_nll.py measures the VAE's); k = 200 would
    )
    # cost the Residual-VAE ~1 h per variant on 2 cores
    raw["tracking"]["enabled"] = False
    raw["ray"].update(storage_path=str(workdir / "ray"), num_cpus=os.cpu_count())
    return validate_params(raw)


def verdict(claim: tuple, variants: dict) -> dict:
    """A claim's two summaries and whether it holds ("holds"), is reversed, or shows no difference."""
    text, variant, baseline, figure, better = claim
    a, b = variants[variant][figure], variants[baseline][figure]
    if not differs(a, b):
        called = "no difference"
    else:
        called = "holds" if (a["mean"] < b["mean"]) == (better == "lower") else "reversed"
    return {
        "claim": text,
        "variant": variant,
        "baseline": baseline,
        "figure": figure,
        "better": better,
        "variant_value": a,
        "baseline_value": b,
        "verdict": called,
    }


def train_and_score(args, work: Path, name: str, seed: int) -> dict:
    """One variant at one seed through the train and evaluate stages: its reported figures and wall times."""
    from latentzoo.stages.evaluate import evaluate_stage
    from latentzoo.training.trainer import TrainOutputs, train_model

    family, overrides = VARIANTS[name]
    params = params_for(args, work, family, overrides, seed)
    tag = f"{name}-seed{seed}"
    out = TrainOutputs(work / tag, work / f"{tag}-train.json", work / f"{tag}-train.csv")
    start = time.perf_counter()
    final = train_model(params, family, work / "shards", out, root=work)
    wall = time.perf_counter() - start
    test = evaluate_stage(
        params,
        out.model_dir,
        work / "shards",
        work / f"{tag}-test.json",
        work / f"{tag}-plots",
        classifier=work / "classifier/model.pt",
    )
    return {k: test[k] for k in REPORTED if k in test} | {"train_wall_s": wall, "fit_time_s": final["fit_time_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--train-images", type=int, default=10000, help="first N training images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=int, default=16, help="resvae_gan.width and disc_width")
    ap.add_argument("--disc-start", type=int, default=300, help="optimizer steps before the critic starts")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--classifier-epochs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=5000, help="images per FID")
    ap.add_argument("--variants", nargs="+", default=CLAIM_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data, models and Ray runs here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from latentzoo.stages.classifier import classifier_stage
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage

    result = {k: v for k, v in vars(args).items() if k not in ("data", "workdir", "out")}
    result |= {"cpus": os.cpu_count(), "variants": {}}
    runs = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="lz-resvae-") as d:
        work = args.workdir.resolve() if args.workdir else Path(d)
        base = params_for(args, work, "vae", {})
        prepare_stage(base, work / "prepared")
        shard_stage(base, work / "prepared", work / "shards")
        result["classifier"] = classifier_stage(base, work / "shards", work / "classifier", work / "classifier.json")
        for seed in args.seeds:
            for name in args.variants:
                runs[name].append(row := train_and_score(args, work, name, seed) | {"seed": seed})
                print(json.dumps({name: row}), flush=True)

    for name, rows in runs.items():
        figures = [k for k in (*REPORTED, "train_wall_s") if k in rows[0]]
        result["variants"][name] = {k: summary([r[k] for r in rows]) for k in figures}
        result["variants"][name] |= {"overrides": VARIANTS[name][1], "runs": rows}
    result["claims"] = [verdict(c, result["variants"]) for c in CLAIMS if {c[1], c[2]} <= set(runs)]
    for c in result["claims"]:
        print(f"{c['verdict']:>13}: {c['claim']}", flush=True)
    write_result("resvae_mnist", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
