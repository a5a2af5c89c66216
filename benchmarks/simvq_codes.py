"""Which of SimVQ's codes go unused on MNIST, and why.

SimVQ's codebook e = C Wᵀ is a linear image of a frozen Gaussian cloud C, so the codes are Gaussian-distributed in
the subspace W spans. The encoder's latents z fill that subspace with a density of their own; a code where no test
latent falls is unused. For each seed this trains SimVQ exactly as `benchmarks/vq_mnist.py`'s `simvq` variant (the
`simvq` defaults, the same autoencoder, optimiser, batches and budget: its `build` and `train`), then measures on the
test split (10,000 images, 490,000 latents):

    used                  fraction of the K codes the test latents select (as vq_mnist reports it)
    W / latent rank       effective rank exp(H(p)), p = singular values / their sum (Roy & Vetterli, 2007), of W
                          and of the centred test latents
    radius used, unused   mean ‖e_k − z̄‖ of the used and of the unused codes, over the latents' mean ‖z − z̄‖
    gap used, unused      mean distance from a code to its nearest test latent (of 50,000), same scale
    unused by radius      the fraction of codes unused in each tenth of the codes sorted by ‖e_k − z̄‖

    .venv/bin/python benchmarks/simvq_codes.py --sizes 8192 --epochs 4 --seeds 0 1 2   # ~4 min a seed, 2 cores

Writes benchmarks/results/simvq_codes.json (or --out); the report shows each figure as mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnist_data import load_mnist  # noqa: E402
from results_io import summary, write_result  # noqa: E402
from vq_mnist import build, train  # noqa: E402

from latentzoo.models.quantizer import nearest_codes  # noqa: E402

FIGURES = ("used", "w_rank", "latent_rank", "radius_used", "radius_unused", "gap_used", "gap_unused")


def effective_rank(matrix: Tensor) -> float:
    """exp of the entropy of the normalised singular values: d for d equal ones, 1 for a rank-1 matrix."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    return math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())


@torch.no_grad()
def code_figures(model, images: Tensor, chunk_size: int, nearest_of: int = 50_000) -> dict:
    """The figures of the module docstring for a trained SimVQ model on `images`."""
    model.eval()
    quantizer = model.quantizer
    z = torch.cat([model.encoder(x).permute(0, 2, 3, 1).reshape(-1, quantizer.dim) for x in images.split(1000)])
    codes = quantizer.codebook
    used = torch.bincount(nearest_codes(z, codes, chunk_size), minlength=quantizer.codebook_size) > 0
    centre = z.mean(0)
    spread = (z - centre).norm(dim=1).mean()
    radius = (codes - centre).norm(dim=1) / spread
    sample = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:nearest_of]]
    gap = torch.cat([torch.cdist(c, sample).min(1).values for c in codes.split(1024)]) / spread
    order = radius.argsort()
    tenths = [(~used[part]).float().mean().item() for part in order.chunk(10)]
    return {
        "used": used.float().mean().item(),
        "w_rank": effective_rank(quantizer.codebook_transform.weight),
        "latent_rank": effective_rank(z - centre),
        "radius_used": radius[used].mean().item(),
        "radius_unused": radius[~used].mean().item() if (~used).any() else float("nan"),
        "gap_used": gap[used].mean().item(),
        "gap_unused": gap[~used].mean().item() if (~used).any() else float("nan"),
        "unused_by_radius": tenths,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192])
    ap.add_argument("--train-images", type=int, default=60000)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # vq_mnist's settings (its defaults), which its build and train read
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/simvq_codes.json"))
    args = ap.parse_args()

    data = Path(args.data)
    train_images, test_images = load_mnist(data, "train", args.train_images), load_mnist(data, "test", args.test_images)
    rows = []
    for size in args.sizes:
        for seed in args.seeds:
            model = build("simvq", size, args, seed)
            seconds, curve = train(model, train_images, test_images, args, seed)
            row = {"codebook_size": size, "seed": seed, "train_s": round(seconds, 1), "curve": curve}
            row |= code_figures(model.cpu(), test_images, args.chunk_size)
            rows.append(row)
            print(
                f"K={size} seed {seed}: used {row['used']:.1%}, W rank {row['w_rank']:.1f}, latent rank "
                f"{row['latent_rank']:.1f}, radius used {row['radius_used']:.2f} unused {row['radius_unused']:.2f}, "
                f"unused by radius tenth {' '.join(f'{t:.0%}' for t in row['unused_by_radius'])}",
                flush=True,
            )
    summaries = []
    for size in args.sizes:
        group = [r for r in rows if r["codebook_size"] == size]
        tenths = [summary([r["unused_by_radius"][i] for r in group]) for i in range(10)]
        summaries.append(
            {"codebook_size": size, **{f: summary([r[f] for r in group]) for f in FIGURES}}
            | {"unused_by_radius": tenths}
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    budget = {"epochs": args.epochs, "train_images": args.train_images}
    write_result("simvq_codes", {**budget, "settings": settings, "rows": rows, "summary": summaries}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
