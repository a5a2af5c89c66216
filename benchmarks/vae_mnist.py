"""VAE on MNIST (IDX files): test negative ELBO after N epochs with Ray Train DDP, and the per-epoch time of
the same model and batches in a plain PyTorch loop measured in the same run (the baseline).

    .venv/bin/python benchmarks/vae_mnist.py --data ../shared/data/mnist --epochs 10 --workers 2

Prints the figures and writes them to benchmarks/results/vae_mnist.json. Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_io import PIPELINE_SECTIONS, read_params, write_result

ROOT = Path(__file__).resolve().parents[1]


def params_for(args, workdir: Path):
    from latentzoo.config import validate_params

    raw = read_params(*PIPELINE_SECTIONS, "vae")
    raw["data"].update(source="idx", path=str(Path(args.data).resolve()))
    raw["shard"]["maxcount"] = 5000
    raw["train"].update(
        num_workers=args.workers, epochs=args.epochs, batch_size=args.batch_size // args.workers, lr=args.lr
    )
    raw["vae"].update(latent_dim=32, hidden_channels=32, fc_hidden=256)
    raw["ray"]["storage_path"] = str(workdir / "ray")
    return validate_params(raw)


def plain_epoch_seconds(params, shard_dir: Path, epochs: int, threads: int) -> float:
    """Same model, optimiser and global batch size, one process, tensors in memory: seconds per epoch
    (optimisation only, like the loop's train_time_s)."""
    from latentzoo.data.prepare import load_split
    from latentzoo.models import build_model

    torch.set_num_threads(threads)
    train = load_split(shard_dir.parent / "prepared", "train")
    x_all = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(params.seed)
    model = build_model("vae", params.vae, tuple(x_all.shape[1:]))
    opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    bs = params.train.batch_size * max(1, params.train.num_workers)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(x_all)).split(bs):
            loss = model(x_all[idx]).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def one_worker_epoch_seconds(args, work: Path) -> float:
    """Ray Train with one worker (all cores, the whole global batch): the loop's overhead against plain PyTorch."""
    from latentzoo.training.trainer import TrainOutputs, train_model

    one = argparse.Namespace(**{**vars(args), "workers": 1, "epochs": args.baseline_epochs + 1})
    params = params_for(one, work / "one")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    out = TrainOutputs(work / "one/model", work / "one/train.json", work / "one/train.csv")
    train_model(params, "vae", work / "shards", out, root=work / "one")
    return steady_mean(column(out.plots_file, "train_time_s"))


def column(csv_file: Path, name: str) -> list[float]:
    rows = [r.split(",") for r in csv_file.read_text().splitlines()]
    return [float(r[rows[0].index(name)]) for r in rows[1:]]


def steady_mean(times: list[float]) -> float:
    """Mean over epochs after the first (which also reads and decodes every shard once)."""
    rest = times[1:] or times
    return sum(rest) / len(rest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--baseline-epochs", type=int, default=2)
    args = ap.parse_args()

    from latentzoo.stages.evaluate import evaluate_stage
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage
    from latentzoo.training.trainer import TrainOutputs, train_model

    with tempfile.TemporaryDirectory(prefix="lz-bench-") as d:
        work = Path(d)
        params = params_for(args, work)
        t0 = time.perf_counter()
        prepare_stage(params, work / "prepared")
        shard_stage(params, work / "prepared", work / "shards")
        t_data = time.perf_counter() - t0
        out = TrainOutputs(work / "models/vae", work / "metrics/train.json", work / "plots/train.csv")
        t0 = time.perf_counter()
        final = train_model(params, "vae", work / "shards", out, root=work)
        t_train = time.perf_counter() - t0
        figures = work / "plots/evaluate"  # the stage replaces this folder whole: not the one holding train.csv
        test = evaluate_stage(params, out.model_dir, work / "shards", work / "metrics/test.json", figures)
        ray_epoch = column(out.plots_file, "epoch_time_s")
        steady = steady_mean(column(out.plots_file, "train_time_s"))
        plain = plain_epoch_seconds(params, work / "shards", args.baseline_epochs, threads=args.workers)
        one = one_worker_epoch_seconds(args, work) if args.workers > 1 else steady
        plain = (plain + plain_epoch_seconds(params, work / "shards", args.baseline_epochs, threads=args.workers)) / 2

    result = {
        "epochs": args.epochs,
        "workers": args.workers,
        "global_batch_size": args.batch_size,
        "test_neg_elbo_nats": test["test_neg_elbo"],
        "test_psnr_db": test["test_psnr"],
        "data_prepare_and_shard_s": t_data,
        "train_wall_s": t_train,
        "ray_fit_s": final["fit_time_s"],
        "ray_train_epoch_s_steady": steady,  # optimisation only (validation apart), epochs 2..N
        "plain_pytorch_epoch_s": plain,  # mean of runs before and after the Ray one-worker run
        "ray_over_plain_epoch_ratio": steady / plain,
        "ray_startup_and_overhead_s": final["fit_time_s"] - sum(ray_epoch),
        "ray_1worker_train_epoch_s": one,
        "ray_1worker_over_plain_epoch_ratio": one / plain,
        "torch_threads_per_worker": max(1, (os.cpu_count() or 1) // args.workers),
    }
    print(json.dumps(result, indent=2))
    write_result("vae_mnist", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
