"""Codebook utilisation of VQ-VAE variants and SimVQ on MNIST, ours beside vector_quantize_pytorch's.

Every run trains the same conv autoencoder (latentzoo's VQVAE: 7x7 latents of dim 32) with the same optimiser,
batches and budget; only the quantizer differs:

    vq              ours, plain VQ-VAE: learned codebook, codebook + commitment loss (arXiv 1711.00937)
    ema-restart     ours, EMA codebook (decay 0.99) + k-means init + dead-code restart
    simvq           ours, SimVQ: codebook = C W^T, frozen random C, one learned linear W (arXiv 2411.02038), with
                    RECIPE: the rotation trick (arXiv 2410.06424), W at codebook_lr_scale x the lr, and W's bias
                    as the `simvq` default sets it
    vqtorch-vq      vector_quantize_pytorch VectorQuantize, learned codebook (no EMA)
    vqtorch-ema-restart  VectorQuantize, EMA (decay 0.99) + kmeans_init + threshold_ema_dead_code
    vqtorch-simvq   vector_quantize_pytorch SimVQ (commitment 0.25 on the input, 1 on the codebook side, as ours),
                    rotation trick on (its default), W at the same codebook_lr_scale x the lr as ours, and our
                    bias setting (its own W has none; it is given an nn.Linear with or without one)

Both sides use the same options where the libraries share them: straight-through gradients for the VQ variants
(the rotation trick, on by default in vector_quantize_pytorch, is switched off there) and the rotation trick for
both SimVQs, commitment weight 0.25, EMA decay 0.99, the same learning rate for each codebook, and the same
initial codebook scale (ours follows vector_quantize_pytorch's kaiming-uniform). What differs: their learnable
codebook is trained by 0.25·||z − e||² where ours has ||sg[z] − e||² + 0.25·||z − sg[e]||², and their dead-code
threshold is on the EMA cluster size (threshold_ema_dead_code=2) where ours counts steps unused (--restart-after).

On the test split (10,000 images, 490,000 latent vectors) it reports utilisation (fraction of codes used),
perplexity exp(H(p)) of the code histogram and PSNR of the reconstructions.

    .venv/bin/pip install vector-quantize-pytorch==1.32.0     # dev-only dependency
    .venv/bin/python benchmarks/vq_mnist.py --sizes 512 8192 65536 --train-images 20000 --epochs 1

Tensors stay in memory and the loop is plain PyTorch (no Ray): this measures the quantizers, not the pipeline.
Add --device cuda on a GPU machine. Writes benchmarks/results/vq_mnist.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnist_data import load_mnist  # noqa: E402
from results_io import differs, stale_sources, summary, write_result  # noqa: E402

from latentzoo.evaluation.metrics import psnr  # noqa: E402
from latentzoo.models.quantizer import CodeCounter, VectorQuantizer  # noqa: E402
from latentzoo.models.vqvae import VQVAE, SimVQConfig, VQVAEConfig  # noqa: E402

OURS = ("vq", "ema-restart", "simvq")
# the `simvq` defaults, both sides
RECIPE = SimVQConfig().model_dump(include={"rotation_trick", "codebook_lr_scale", "bias"})
THEIRS = ("vqtorch-vq", "vqtorch-ema-restart", "vqtorch-simvq")


class TheirQuantizer(nn.Module):
    """vector_quantize_pytorch's layer behind our quantizer interface: z (B, D, H, W) → (z_q, codes, losses)."""

    def __init__(self, layer: nn.Module, codebook_size: int):
        super().__init__()
        self.layer, self.codebook_size = layer, codebook_size

    def forward(self, z: Tensor):
        quantized, indices, loss = self.layer(z)
        return quantized, indices, {"vq": loss.sum()}


def quantizer(variant: str, size: int, dim: int, args) -> nn.Module:
    if variant == "vq":
        return VectorQuantizer(size, dim, chunk_size=args.chunk_size)
    if variant == "ema-restart":
        return VectorQuantizer(
            size,
            dim,
            ema=True,
            decay=0.99,
            kmeans_init=True,
            restart_after=args.restart_after,
            chunk_size=args.chunk_size,
        )
    if variant == "simvq":
        return SimVQConfig(codebook_size=size, codebook_dim=dim, chunk_size=args.chunk_size, **RECIPE).build_quantizer()
    import vector_quantize_pytorch as vqp

    if variant == "vqtorch-vq":
        layer = vqp.VectorQuantize(
            dim,
            size,
            commitment_weight=0.25,
            learnable_codebook=True,
            ema_update=False,
            rotation_trick=False,
            accept_image_fmap=True,
        )
    elif variant == "vqtorch-ema-restart":
        layer = vqp.VectorQuantize(
            dim,
            size,
            commitment_weight=0.25,
            decay=0.99,
            kmeans_init=True,
            threshold_ema_dead_code=2,
            rotation_trick=False,
            accept_image_fmap=True,
        )
    elif variant == "vqtorch-simvq":
        transform = nn.Linear(dim, dim, bias=RECIPE["bias"])  # theirs has no bias unless given this layer
        layer = vqp.SimVQ(dim, size, transform, channel_first=True, rotation_trick=RECIPE["rotation_trick"])
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return TheirQuantizer(layer, size)


def build(variant: str, size: int, args, seed: int) -> VQVAE:
    """The same encoder/decoder (seeded identically) around the variant's quantizer. Both SimVQs get RECIPE's
    config, so `optimizer_groups` gives W the same lr scale on both sides."""
    shape = {"hidden_channels": 32, "codebook_dim": args.dim, "codebook_size": size}
    config = SimVQConfig(**RECIPE, **shape) if variant.endswith("simvq") else VQVAEConfig(**shape)
    torch.manual_seed(seed)
    model = VQVAE(config, (1, 28, 28))  # its own quantizer is replaced by the variant's below
    torch.manual_seed(seed + 1)
    model.quantizer = quantizer(variant, size, args.dim, args)
    return model.to(args.device)


def train(model: VQVAE, images: Tensor, test_images: Tensor, args, seed: int) -> tuple[float, list[dict]]:
    """Train for args.epochs; return the training seconds and the test figures after every epoch (the curve)."""
    # each group at lr x its "lr_scale" (the codebook's, or SimVQ's W), as the training loop sets it; not imported
    # from the loop, so this benchmark's sources (and its freshness) are the model code alone
    groups = [{**group, "lr": args.lr * group.get("lr_scale", 1.0)} for group in model.optimizer_groups()]
    optimizer = torch.optim.Adam(groups, lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    seconds, curve = 0.0, []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start = time.perf_counter()
        for idx in torch.randperm(len(images), generator=generator).split(args.batch_size):
            loss = model(images[idx].to(args.device)).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        curve.append({"epoch": epoch, **evaluate(model, test_images, args)})
    return seconds, curve


@torch.no_grad()
def evaluate(model: VQVAE, images: Tensor, args) -> dict:
    model.eval()
    counter = CodeCounter(model.codebook_size, args.device)
    total_psnr = 0.0
    for x in images.split(1000):
        x = x.to(args.device)
        out = model(x)
        counter.add(out.codes)
        total_psnr += psnr(out.recon, x).sum().item()
    return {**counter.usage(), "psnr": total_psnr / len(images)}


def run(variant: str, size: int, train_images: Tensor, test_images: Tensor, args, seed: int) -> dict:
    model = build(variant, size, args, seed)
    seconds, curve = train(model, train_images, test_images, args, seed)
    budget = {"train_images": len(train_images), "epochs": args.epochs, "batch_size": args.batch_size}
    result = {
        "variant": variant,
        "codebook_size": size,
        "seed": seed,
        **budget,
        "train_s": round(seconds, 1),
        **curve[-1],  # the figures after the last epoch
        "curve": curve,
    }
    del result["epoch"]
    print(
        f"{variant:>20} K={size:>6} seed {seed}  used {result['utilisation']:7.2%}  "
        f"perplexity {result['perplexity']:8.1f}  PSNR {result['psnr']:5.2f} dB  ({seconds:.0f}s)",
        flush=True,
    )
    return result


FIGURES = ("utilisation", "perplexity", "psnr")


def summaries(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(variant, K): {figure: mean ± std summary over the seeds}}."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["codebook_size"]), []).append(row)
    return {key: {f: summary([r[f] for r in group]) for f in FIGURES} for key, group in groups.items()}


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets as PASS / FAIL / NOT MEASURED lines; "better" only when mean ± std intervals do not
    overlap (with one seed, the intervals are points)."""
    got = summaries(rows)
    lines = []

    def check(name: str, a: tuple[str, int], b: tuple[str, int] | None, ok) -> None:
        if a not in got or (b is not None and b not in got):
            lines.append(f"NOT MEASURED  {name}")
        else:
            lines.append(f"{'PASS' if ok(got[a], got.get(b)) else 'FAIL'}  {name}")

    def better(figure):
        return lambda x, y: x[figure]["mean"] > y[figure]["mean"] and differs(x[figure], y[figure])

    for size, floor in ((512, 0.9), (8192, 0.9), (65536, 0.8)):  # #22: 90% of 8,192 codes, 80% of 65,536
        check(
            f"simvq utilisation >= {floor:.0%} at K={size}",
            ("simvq", size),
            None,
            lambda x, _, floor=floor: x["utilisation"]["mean"] >= floor,
        )
        check(
            f"simvq PSNR not below ema-restart's at K={size}",
            ("simvq", size),
            ("ema-restart", size),
            lambda x, y: not better("psnr")(y, x),
        )
    for size in (8192, 65536):
        check(f"simvq utilisation above plain vq's at K={size}", ("simvq", size), ("vq", size), better("utilisation"))
        check(f"simvq PSNR above plain vq's at K={size}", ("simvq", size), ("vq", size), better("psnr"))
    for ours, theirs in (("simvq", "vqtorch-simvq"), ("ema-restart", "vqtorch-ema-restart")):
        for size in (512, 8192, 65536):
            check(
                f"{ours} utilisation not below {theirs}'s at K={size}",
                (ours, size),
                (theirs, size),
                lambda x, y: not better("utilisation")(y, x),
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 8192, 65536])
    ap.add_argument("--variants", nargs="+", default=[*OURS, *THEIRS], choices=[*OURS, *THEIRS])
    ap.add_argument(
        "--their-sizes",
        type=int,
        nargs="+",
        default=None,
        help="the sizes at which vector_quantize_pytorch's variants run (default: all of --sizes); on 2 CPU cores "
        "their plain VQ takes ~5 s a step at K=65,536 (benchmarks/vq_speed.py), 40 min a seed",
    )
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--restart-after", type=int, default=20, help="ours: steps a code may go unused")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vq_mnist.json"))
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out (other sizes, budgets or seeds; an earlier session's), replacing those "
        "rerun; rows measured with other code or settings are dropped",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = Path(args.data)
    train_images, test_images = load_mnist(data, "train", args.train_images), load_mnist(data, "test", args.test_images)
    out = Path(args.out)
    rows, earlier_runs = kept_rows(out, args) if args.append else ([], [])
    for size in args.sizes:
        for variant in args.variants:
            if variant in THEIRS and args.their_sizes is not None and size not in args.their_sizes:
                continue
            for seed in args.seeds:
                row = run(variant, size, train_images, test_images, args, seed)
                same = (variant, size, seed)
                rows = [r for r in rows if (r["variant"], r["codebook_size"], r.get("seed", 0)) != same] + [row]
                save(out, rows, earlier_runs, args)  # after every run: an interrupted run keeps its rows
    print("\n".join(check_targets(rows)))
    return 0


def settings_of(args) -> dict:
    """The options every row of one result shares (each row records its own size, variant, seed and budget)."""
    per_row = ("out", "data", "append", "sizes", "variants", "their_sizes", "train_images", "epochs", "seeds")
    return {k: v for k, v in vars(args).items() if k not in per_row}


def kept_rows(out: Path, args) -> tuple[list[dict], list[dict]]:
    """The rows of an earlier run in `out` that this run may extend, and the runs they were measured in (command,
    date, commit): none if that run's code (the files it imported, as `results_io` recorded them) or its shared
    settings differ from this one's."""
    if not out.exists():
        return [], []
    earlier = json.loads(out.read_text())
    changed = stale_sources(earlier)
    shared = {k: v for k, v in earlier.get("settings", {}).items() if k != "seeds"}  # older files recorded them
    if changed or shared != settings_of(args):
        why = f"{', '.join(changed[:3])} changed" if changed else "other settings"
        print(f"--append: dropping the {len(earlier['rows'])} rows of {out} ({why})", flush=True)
        return [], []
    runs = [*earlier.get("earlier_runs", []), {k: earlier.get(k) for k in ("command", "date", "commit")}]
    return earlier["rows"], runs


def save(out: Path, rows: list[dict], earlier_runs: list[dict], args) -> None:
    cpu = f"cpu, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    settings = settings_of(args)
    rows = sorted(rows, key=lambda r: (r["codebook_size"], [*OURS, *THEIRS].index(r["variant"]), r.get("seed", 0)))
    result = {
        "earlier_runs": earlier_runs,  # the runs whose rows --append kept
        "settings": settings,
        "device": device,
        "rows": rows,
        "summary": [{"variant": v, "codebook_size": k, **figs} for (v, k), figs in summaries(rows).items()],
        "targets": check_targets(rows),
    }
    write_result("vq_mnist", result, out)


if __name__ == "__main__":
    sys.exit(main())
