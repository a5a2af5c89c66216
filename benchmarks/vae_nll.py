"""The VAE's test likelihood on dynamically binarised MNIST, as VAE papers report it, over several seeds.

For each seed: the pipeline's VAE (params.yaml's `vae` section unless overridden) trained with Adam on the 60,000
training digits, dynamically binarised each step (x ~ Bernoulli(x), inside the model), then scored on the 10,000
test digits binarised once (seeded): −ELBO with one sample of z, and the importance-sampled NLL with k samples of
q(z|x) (`latentzoo.evaluation.likelihood`, the evaluate stage's code). Reported as mean ± standard deviation over
the seeds, beside the published anchors (pythae's VAE, k = 200: 89.78 nats; VampPrior: 85.6).

    .venv/bin/python benchmarks/vae_nll.py --data ../shared/data/mnist --seeds 0 1 2 --epochs 50 --k 1000 \
        --jobs 3 --threads 1 --workdir .bench/vae_nll

A seed's 50 epochs and its k = 1000 scoring cost about the same CPU time (about 40 CPU-minutes each); the three
seeds take over 2 h on 2 cores. With --workdir each seed's model is kept after every epoch, so a run stopped
while training or scoring is taken up again by the same command.

Every --curve-every epochs it also scores the first --curve-images test digits (k = --curve-k), the learning curve.

Tensors stay in memory and the loop is plain PyTorch (no Ray): this measures the model and the bound, not the
pipeline's speed (`vae_mnist.py` does that). Add --device cuda on a GPU machine. Writes
benchmarks/results/vae_nll.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnist_data import load_mnist  # noqa: E402
from results_io import read_params, source_hashes, stale_sources, summary, write_result  # noqa: E402

from latentzoo.evaluation.likelihood import importance_sampled_nll  # noqa: E402
from latentzoo.models.vae import VAE, VAEConfig  # noqa: E402

NOT_TRAINING = ("seeds", "out", "workdir", "jobs", "threads", "k", "test_images")  # options training ignores
ANCHORS = {"pythae VAE (k = 200)": 89.78, "VampPrior (Tomczak & Welling, 2018)": 85.6}


def train(
    model: VAE, images: Tensor, test_images: Tensor, args, seed: int, keep: Kept | None
) -> tuple[float, list[dict]]:
    """Adam over the training digits; the seconds it took (curve points excluded) and the learning curve: test
    -ELBO and NLL_k (k = --curve-k, first --curve-images test digits) every --curve-every epochs. With `keep`, the
    state after every epoch (weights, optimizer, random streams) is saved, and a run stopped part-way resumes from
    it exactly where it stopped."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    curve, spent, first = [], 0.0, 0
    if keep and (state := keep.load("partial")):
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        order.set_state(state["order"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        curve, spent, first = state["curve"], state["train_s"], state["epoch"]
        print(f"  seed {seed}: resumed after epoch {first} from {keep.path('partial')}", flush=True)
    for epoch in range(first, args.epochs):
        model.train()
        start = time.perf_counter()
        total = 0.0
        for idx in torch.randperm(len(images), generator=order).split(args.batch_size):
            loss = model(images[idx]).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        spent += time.perf_counter() - start
        print(f"  seed {seed} epoch {epoch + 1}/{args.epochs}: train loss {total / len(images):.2f}", flush=True)
        if args.curve_every and (epoch + 1) % args.curve_every == 0:
            point = score(model, test_images[: args.curve_images], args.curve_k, seed)
            curve.append({"epoch": epoch + 1, "neg_elbo": point["neg_elbo"], "nll": point["nll"]})
        if keep and epoch + 1 < args.epochs:
            rng = {"rng": torch.get_rng_state(), "order": order.get_state(), "optimizer": optimizer.state_dict()}
            if args.device.startswith("cuda"):
                rng["cuda_rng"] = torch.cuda.get_rng_state()
            keep.save("partial", model, spent, curve, epoch=epoch + 1, **rng)
    return spent, curve


@dataclass
class Kept:
    """A seed's model in --workdir: `seed<N>.pt` once trained, `seed<N>.partial.pt` after each epoch before that.
    Each file records the settings and the hashes of the code that wrote it; one made with other settings or code
    is ignored (and replaced)."""

    workdir: Path
    seed: int
    settings: dict

    def path(self, kind: str) -> Path:
        return self.workdir / (f"seed{self.seed}.pt" if kind == "trained" else f"seed{self.seed}.{kind}.pt")

    def load(self, kind: str) -> dict | None:
        path = self.path(kind)
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved if saved["settings"] == self.settings and not stale_sources(saved) else None

    def save(self, kind: str, model: VAE, train_s: float, curve: list[dict], **extra) -> None:
        state = {"state_dict": model.state_dict(), "train_s": train_s, "curve": curve, "settings": self.settings}
        path = self.path(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state | extra | {"sources": source_hashes()}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)


def trained(cfg: VAEConfig, images: Tensor, test_images: Tensor, args, seed: int) -> tuple[VAE, float, list[dict]]:
    """The seed's trained model, its training seconds and curve. With --workdir the model is kept there (`Kept`):
    a run stopped while training or scoring takes it up again."""
    torch.manual_seed(seed)
    model = VAE(cfg, (1, 28, 28)).to(args.device)
    wanted = {"model": cfg.model_dump(), **{k: v for k, v in vars(args).items() if k not in NOT_TRAINING}}
    keep = Kept(Path(args.workdir), seed, wanted) if args.workdir else None
    if keep and (saved := keep.load("trained")):
        print(f"  seed {seed}: trained model from {keep.path('trained')}", flush=True)
        model.load_state_dict(saved["state_dict"])
        return model, saved["train_s"], saved["curve"]
    train_s, curve = train(model, images, test_images, args, seed, keep)
    if keep:
        keep.save("trained", model, train_s, curve)
        keep.path("partial").unlink(missing_ok=True)
    return model, train_s, curve


@torch.no_grad()
def score(model: VAE, images: Tensor, k: int, seed: int) -> dict:
    """-ELBO (one z) and NLL_k, nats per image, on one seeded binarisation of `images`."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(10_000 + seed)
    neg_elbo = nll = 0.0
    start = time.perf_counter()
    for x in images.split(500):
        x = torch.bernoulli(x, generator=generator)
        neg_elbo += float(model(x, generator=generator).metrics["neg_elbo"]) * len(x)
        nll += float(importance_sampled_nll(model, x, k, generator).sum())
    return {"neg_elbo": neg_elbo / len(images), "nll": nll / len(images), "eval_s": time.perf_counter() - start}


def in_parallel(args) -> list[dict]:
    """Each seed in its own process, `args.jobs` at a time (a GPU has room for several of these small models); the
    rows of their results, in seed order. Every process runs this script with the same options and one seed."""
    options, skipping = [], False
    for arg in sys.argv[1:]:  # without --jobs, --seeds and --out (and their values): each process gets its own
        if arg.split("=")[0] in ("--jobs", "--seeds", "--out"):
            skipping = "=" not in arg
        elif not (skipping and not arg.startswith("--")):
            skipping = False
            options.append(arg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-nll-") as tmp:
        for batch in range(0, len(args.seeds), args.jobs):
            seeds = args.seeds[batch : batch + args.jobs]
            outs = {s: Path(tmp) / f"seed{s}.json" for s in seeds}
            procs = [
                subprocess.Popen([sys.executable, __file__, *options, "--seeds", str(s), "--out", str(outs[s])])
                for s in seeds
            ]
            if any([p.wait() != 0 for p in procs]):  # every process waited for
                raise SystemExit("a seed's process failed")
            rows += [json.loads(outs[s].read_text())["rows"][0] for s in seeds]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=200, help="importance samples per test image")
    ap.add_argument("--curve-every", type=int, default=10, help="epochs between learning-curve points (0: none)")
    ap.add_argument("--curve-k", type=int, default=100, help="importance samples at the curve's points")
    ap.add_argument("--curve-images", type=int, default=1000, help="test digits scored at the curve's points")
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--test-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="e.g. cuda on a GPU machine")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, each in its own process")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None, help="keep each seed's model here after every epoch (a rerun resumes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VAEConfig.model_validate(read_params("vae")["vae"])
    data = Path(args.data)
    train_images = load_mnist(data, "train", args.train_images).to(args.device)
    test_images = load_mnist(data, "test", args.test_images).to(args.device)

    rows = in_parallel(args) if args.jobs > 1 and len(args.seeds) > 1 else []
    for seed in args.seeds if not rows else ():
        model, train_s, curve = trained(cfg, train_images, test_images, args, seed)
        row = {"seed": seed, "train_s": train_s, **score(model, test_images, args.k, seed)}
        row["curve"] = curve
        print(f"seed {seed}: test -ELBO {row['neg_elbo']:.2f}, NLL (k={args.k}) {row['nll']:.2f} nats", flush=True)
        rows.append(row)
    result = {
        "model": cfg.model_dump(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "train_images": len(train_images),
        "test_images": len(test_images),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "k": args.k,
        "curve": {"every": args.curve_every, "k": args.curve_k, "images": args.curve_images},
        "seeds": args.seeds,
        "rows": rows,
        "neg_elbo": summary([r["neg_elbo"] for r in rows]),
        "nll": summary([r["nll"] for r in rows]),
        "anchors": ANCHORS,
    }
    write_result("vae_nll", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
