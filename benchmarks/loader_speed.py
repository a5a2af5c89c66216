"""The pipeline's WebDataset loader against an in-memory TensorDataset + DataLoader, measured in the same run.

MNIST (IDX files) is prepared and sharded into a temp dir by the pipeline's own prepare and shard stages
(params.yaml's shard.maxcount, train.batch_size, train.shuffle_buffer and seed). Then, for one worker rank
(rank 0 of 1), the training split is read as training batches, float (B, 1, 28, 28) in [0, 1]:

    tensordataset  torch.utils.data.DataLoader(TensorDataset(x, y), batch_size, shuffle=True, drop_last=True),
                   x already float in memory (the baseline)
    streamed       latentzoo.data.loader.train_batches(cached=False): the tars read every epoch, whole blocks
                   through the shuffle buffer
    cached         train_batches(cached=True): shards read once into the per-process CACHE (its first epoch,
                   which fills it, is reported apart), then exact in-memory shuffles

Shards hold blocks of raw uint8 images (latentzoo.data.shards), so neither streamed nor cached decodes images.
For larger images the fair bar is the decode floor: --rgb-images N digits of the training split, colourised and
padded to 64x64 RGB, written as PNG files (an image folder), prepared and sharded by the pipeline's stages; the
streamed loader's images/s over those shards is compared with the machine's decode floor, the single-core PNG
decode rate of the same files x the cores (target >= 0.8x).

Each round times one epoch of each, in that order (--rounds rounds); the median epoch gives images/s, and each
loader's ratio to the TensorDataset's is the figure, against the target >= 0.8x (PASS/FAIL text). The pipeline
trains cached when the decoded train + val splits fit train.cache_mb, streamed otherwise. Other processes spoil
the timings (with 2 torch threads on 2 busy cores small tensor ops slow down many times): each round waits up to
--wait-idle seconds for idle CPUs, and the share other processes took is recorded (others_cpu_busy).

    .venv/bin/python benchmarks/loader_speed.py --data ../shared/data/mnist
    .venv/bin/python benchmarks/loader_speed.py --quick       # 2,000 images, 1 round; writes only with --out

Writes benchmarks/results/loader_speed.json (or --out). Exits non-zero only on errors, never on slowness.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from results_io import provenance, write_result
from vq_speed import cpu_ticks, others_busy, wait_idle

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.8  # loader images/s over TensorDataset images/s


def params_for(args):
    from latentzoo.config import validate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source="idx", path=str(Path(args.data).resolve()), limit=args.train_images)
    if args.batch_size:
        raw["train"]["batch_size"] = args.batch_size
    return validate_params(raw)


def timed_epoch(batches) -> tuple[float, int]:
    """(seconds, images) to draw every batch of one epoch."""
    start, images = time.perf_counter(), 0
    for x, _ in batches:
        images += x.shape[0]
    return time.perf_counter() - start, images


def tensor_loader(prepared: Path, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """The baseline: the same training split as float tensors in memory, shuffled by a plain DataLoader."""
    from latentzoo.data.prepare import load_split

    train = load_split(prepared, "train")
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    y = torch.from_numpy(train.labels.astype("int64"))
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def one_rank(params, urls: list[str], steps: int, epoch: int, cached: bool):
    """The pipeline's training batches of one epoch for rank 0 of 1, with params' batch size, seed and buffer."""
    from latentzoo.data.loader import train_batches

    return train_batches(
        urls,
        steps=steps,
        batch_size=params.train.batch_size,
        rank=0,
        world_size=1,
        seed=params.seed,
        epoch=epoch,
        shuffle_buffer=params.train.shuffle_buffer,
        cached=cached,
    )


def measure(params, shard_dir: Path, prepared: Path, rounds: int, idle_s: float) -> dict:
    """Seconds per epoch of each variant, rounds interleaved so that drift hits all of them alike."""
    from latentzoo.data.loader import steps_per_epoch
    from latentzoo.data.shards import load_manifest, shard_urls

    urls = shard_urls(shard_dir, load_manifest(shard_dir), "train")
    baseline = tensor_loader(prepared, params.train.batch_size, params.seed)
    steps = steps_per_epoch(len(baseline.dataset), 1, params.train.batch_size)

    def pipeline(cached: bool, epoch: int):
        return one_rank(params, urls, steps, epoch, cached)

    cache_fill_s, _ = timed_epoch(pipeline(True, epoch=rounds))  # decodes every shard into CACHE once
    times: dict[str, list[float]] = {"tensordataset": [], "streamed": [], "cached": []}
    images, busy = {}, []
    for epoch in range(rounds):
        wait_idle(idle_s)
        ticks = cpu_ticks()
        for name, batches in (
            ("tensordataset", baseline),
            ("streamed", pipeline(False, epoch)),
            ("cached", pipeline(True, epoch)),
        ):
            seconds, images[name] = timed_epoch(batches)
            times[name].append(seconds)
            print(f"round {epoch + 1}/{rounds}: {name:13s} {images[name] / seconds:10,.0f} images/s", flush=True)
        busy.append(others_busy(ticks, cpu_ticks()))  # other processes skew the timings: recorded, not hidden
    rows = {
        name: {
            "epoch_s": statistics.median(t),
            "epoch_s_all": t,
            "images_per_epoch": images[name],
            "images_per_s": images[name] / statistics.median(t),
        }
        for name, t in times.items()
    }
    rows["cached"]["first_epoch_s"] = cache_fill_s
    rows["cached"]["first_epoch_images_per_s"] = images["cached"] / cache_fill_s
    return {
        "split_images": len(baseline.dataset),
        "urls": len(urls),
        "steps_per_epoch": steps,
        "rows": rows,
        "others_cpu_busy": max(busy),
    }


def colour_folder(prepared: Path, folder: Path, count: int, size: int = 64) -> Path:
    """The first `count` training digits as size×size RGB PNGs, one folder per class: scaled up by an integer
    factor, padded, strokes in a random colour over a darker random background."""
    from PIL import Image

    from latentzoo.data.prepare import load_split

    train = load_split(prepared, "train")
    rng = np.random.default_rng(0)
    h = train.images.shape[1]
    scale = size // h
    pad = (size - h * scale) // 2
    for i, (image, label) in enumerate(zip(train.images[:count], train.labels[:count])):
        grey = np.pad(np.kron(image[..., 0] / 255.0, np.ones((scale, scale))), pad)[:, :, None]
        ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.3, 3)
        rgb = ((grey * ink + (1 - grey) * paper) * 255).round().astype(np.uint8)
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(folder / str(label) / f"{i:06d}.png")
    return folder


def decode_rate(folder: Path) -> float:
    """Single-core PNG decode rate of the folder's files (images/s): read, decode to a uint8 array."""
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    start = time.perf_counter()
    for f in files:
        np.asarray(Image.open(f).convert("RGB"))
    return len(files) / (time.perf_counter() - start)


def measure_rgb(args, params, prepared: Path, work: Path) -> dict:
    """Streamed images/s over 64x64 RGB shards against the decode floor (single-core PNG decode rate x cores)."""
    from latentzoo.config import validate_params
    from latentzoo.data.loader import steps_per_epoch
    from latentzoo.data.shards import load_manifest, shard_urls
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage

    torch.set_num_threads(1)  # the decode floor is measured on one core
    folder = colour_folder(prepared, work / "rgb-folder", args.rgb_images)
    raw = params.model_dump()
    raw["data"].update(source="imagefolder", path=str(folder), limit=None, image_size=64, channels=3)
    rgb = validate_params(raw)
    prepare_stage(rgb, work / "rgb-prepared")
    shard_stage(rgb, work / "rgb-prepared", work / "rgb-shards")
    urls = shard_urls(work / "rgb-shards", load_manifest(work / "rgb-shards"), "train")
    n = load_manifest(work / "rgb-shards")["splits"]["train"]["count"]
    steps = steps_per_epoch(n, 1, rgb.train.batch_size)
    torch.set_num_threads(args.threads)
    rates, streamed = [], []
    for epoch in range(args.rounds):
        wait_idle(args.wait_idle)
        rates.append(decode_rate(folder))
        seconds, images = timed_epoch(one_rank(rgb, urls, steps, epoch, cached=False))
        streamed.append(images / seconds)
        print(f"round {epoch + 1}: png decode {rates[-1]:,.0f}/s on 1 core; streamed {streamed[-1]:,.0f}/s", flush=True)
    cores = os.cpu_count() or 1
    floor = statistics.median(rates) * cores
    ratio = statistics.median(streamed) / floor
    return {
        "images": args.rgb_images,
        "train_images": n,
        "image_shape": [3, 64, 64],
        "png_decode_per_core_per_s": statistics.median(rates),
        "cores": cores,
        "decode_floor_per_s": floor,
        "streamed_per_s": statistics.median(streamed),
        "ratio_vs_decode_floor": ratio,
        "target": "PASS" if ratio >= TARGET else "FAIL",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--train-images", type=int, default=None, help="first N training images (default: all)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: params.yaml train.batch_size")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of each variant")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (one rank: all cores)")
    ap.add_argument("--wait-idle", type=float, default=120, help="seconds to wait for idle CPUs before each round")
    ap.add_argument("--rgb-images", type=int, default=10000, help="64x64 RGB PNGs for the decode-floor test (0: off)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 images, 1 round, marked smoke")
    ap.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/loader_speed.json; none with --quick)"
    )
    args = ap.parse_args()
    if args.quick:
        args.train_images, args.rounds, args.wait_idle = args.train_images or 2000, 1, 0
        args.rgb_images = min(args.rgb_images, 1000)

    from latentzoo.data.shards import load_manifest
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage
    from latentzoo.training.trainer import fits_in_cache

    torch.set_num_threads(args.threads)
    params = params_for(args)
    with tempfile.TemporaryDirectory(prefix="lz-loader-") as d:
        work = Path(d)
        prepare_stage(params, work / "prepared")
        shard_stage(params, work / "prepared", work / "shards")
        manifest = load_manifest(work / "shards")
        measured = measure(params, work / "shards", work / "prepared", args.rounds, args.wait_idle)
        rgb = measure_rgb(args, params, work / "prepared", work) if args.rgb_images else None

    rows = measured.pop("rows")
    base = rows["tensordataset"]["images_per_s"]
    for name in ("streamed", "cached"):
        rows[name]["ratio_vs_tensordataset"] = rows[name]["images_per_s"] / base
        rows[name]["target"] = "PASS" if rows[name]["ratio_vs_tensordataset"] >= TARGET else "FAIL"
    result = {
        **provenance(),
        "smoke": args.quick,
        "train_images": measured["split_images"],  # the training split (data.limit minus val)
        "steps_per_epoch": measured["steps_per_epoch"],
        "batch_size": params.train.batch_size,
        "shard_maxcount": params.shard.maxcount,
        "shuffle_buffer": params.train.shuffle_buffer,
        "shards": measured["urls"],
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "others_cpu_busy": measured["others_cpu_busy"],  # fraction of all CPUs other processes used, worst round
        "pipeline_uses": "cached" if fits_in_cache(manifest, params.train.cache_mb) else "streamed",
        "target_ratio": TARGET,
        "rows": rows,
        "rgb_64": rgb,
    }
    print(json.dumps(result, indent=2))
    for name in ("streamed", "cached"):
        print(
            f"{rows[name]['target']}  {name} loader {rows[name]['ratio_vs_tensordataset']:.2f}x TensorDataset "
            f"(target >= {TARGET}x)"
        )
    if rgb:
        print(
            f"{rgb['target']}  streamed 64x64 RGB {rgb['ratio_vs_decode_floor']:.2f}x the decode floor "
            f"({rgb['png_decode_per_core_per_s']:,.0f} PNG/s per core x {rgb['cores']}) (target >= {TARGET}x)"
        )
    if measured["others_cpu_busy"] > 0.1:
        print(
            f"note: other processes kept {100 * measured['others_cpu_busy']:.0f}% of the CPUs busy: "
            "the timings are disturbed"
        )
    if args.out or not args.quick:
        write_result("loader_speed", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
