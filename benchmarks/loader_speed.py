"""The pipeline's WebDataset loader against an in-memory TensorDataset + DataLoader, measured in the same run.

MNIST (IDX files) is prepared and sharded into a temp dir by the pipeline's own prepare and shard stages
(params.yaml's shard.maxcount, train.batch_size, train.shuffle_buffer and seed). Then, for one worker rank
(rank 0 of 1), the training split is read as training batches, float (B, 1, 28, 28) in [0, 1]:

    tensordataset  torch.utils.data.DataLoader(TensorDataset(x, y), batch_size, shuffle=True, drop_last=True),
                   x already float in memory (the baseline)
    streamed       latentzoo.data.loader.train_batches(cached=False): the tars read every epoch, whole blocks
                   through the shuffle buffer
    cached         train_batches(cache=...): shards decoded once into the node cache (latentzoo.data.cache; its
                   first epoch, which fills it, is reported apart), then exact shuffles of the mapped arrays

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

Node memory of the cache (node_cache_memory): --workers processes (spawned, like Ray's workers) each read every
training shard and draw every image once, either from the node cache (shared: the files mapped read-only) or
from their own decoded copy (copied: what each worker held before the node cache). The figure is the sum over
the workers of the growth of their proportional set size (PSS: a page shared by W processes counts 1/W in each),
taken while all of them hold their arrays; shared / copied is the ratio (1/W when the pages are shared).

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
from results_io import provenance, read_params, write_result
from vq_speed import cpu_ticks, others_busy, wait_idle

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.8  # loader images/s over TensorDataset images/s


def params_for(args):
    from latentzoo.config import validate_params

    raw = read_params("seed", "data", "shard", "train")
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


def one_rank(params, urls: list[str], steps: int, epoch: int, cache=None):
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
        cache=cache,
    )


def measure(params, shard_dir: Path, prepared: Path, rounds: int, idle_s: float, cache) -> dict:
    """Seconds per epoch of each variant, rounds interleaved so that drift hits all of them alike."""
    from latentzoo.data.loader import steps_per_epoch
    from latentzoo.data.shards import load_manifest, shard_urls

    urls = shard_urls(shard_dir, load_manifest(shard_dir), "train")
    baseline = tensor_loader(prepared, params.train.batch_size, params.seed)
    steps = steps_per_epoch(len(baseline.dataset), 1, params.train.batch_size)

    def pipeline(cached: bool, epoch: int):
        return one_rank(params, urls, steps, epoch, cache if cached else None)

    cache_fill_s, _ = timed_epoch(pipeline(True, epoch=rounds))  # decodes every shard into the node cache once
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


def pss_bytes() -> int:
    """This process's proportional set size (Linux)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def cache_worker(urls: list[str], cache, barrier, out) -> None:
    """One worker's PSS growth for holding every image of `urls`: mapped from `cache`, or decoded (cache None)."""
    from latentzoo.data.cache import Samples
    from latentzoo.data.loader import decode_shard

    before = pss_bytes()
    if cache:
        samples = cache.samples(urls, decode_shard)
    else:  # each worker's own copy, as before the node cache (filled shard by shard: no concatenation)
        images, labels, filled = None, [], 0
        for url in urls:
            shard = decode_shard(url)
            if images is None:
                images = np.empty((len(urls) * len(shard.labels), *shard.images.shape[1:]), np.uint8)
            images[filled : filled + len(shard.labels)] = shard.images
            labels.append(shard.labels)
            filled += len(shard.labels)
        samples = Samples(images[:filled], np.concatenate(labels), np.arange(filled))
    for i in range(0, len(samples), 4096):  # draw every image once: every page is read
        samples.take(np.arange(i, min(i + 4096, len(samples))))
    barrier.wait()  # every worker holds its arrays: shared pages are split between them
    out.put(pss_bytes() - before)
    barrier.wait()


def node_cache_memory(urls: list[str], cache, workers: int) -> dict:
    """Sum of the workers' PSS growth, node cache (shared) vs one decoded copy per worker (copied)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    grown = {}
    for name, node in (("copied", None), ("shared", cache)):
        if node:
            node.clear()
        barrier, out = ctx.Barrier(workers), ctx.Queue()
        procs = [ctx.Process(target=cache_worker, args=(urls, node, barrier, out)) for _ in range(workers)]
        for p in procs:
            p.start()
        grown[name] = sum(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
        print(f"node cache memory, {name}: {grown[name] / 2**20:,.0f} MiB over {workers} workers", flush=True)
    return {
        "workers": workers,
        "copied_mib": grown["copied"] / 2**20,
        "shared_mib": grown["shared"] / 2**20,
        "ratio_shared_vs_copied": grown["shared"] / grown["copied"],
        "cache_folder": str(cache.folder().parent),
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
        seconds, images = timed_epoch(one_rank(rgb, urls, steps, epoch))
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
    ap.add_argument("--workers", type=int, default=2, help="processes sharing the node cache (memory figure)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 images, 1 round, marked smoke")
    ap.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/loader_speed.json; none with --quick)"
    )
    args = ap.parse_args()
    if args.quick:
        args.train_images, args.rounds, args.wait_idle = args.train_images or 2000, 1, 0
        args.rgb_images = min(args.rgb_images, 1000)

    from latentzoo.data.shards import load_manifest, sha256_file, shard_urls
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage
    from latentzoo.training.job import node_cache

    torch.set_num_threads(args.threads)
    params = params_for(args)
    with tempfile.TemporaryDirectory(prefix="lz-loader-") as d:
        work = Path(d)
        prepare_stage(params, work / "prepared")
        shard_stage(params, work / "prepared", work / "shards")
        manifest = load_manifest(work / "shards")
        # the node cache of these shards, whatever train.cache_mb says (the pipeline's choice is recorded below)
        urls = {split: shard_urls(work / "shards", manifest, split) for split in ("train", "val")}
        cache = node_cache(manifest, sha256_file(work / "shards/manifest.json"), urls, cache_mb=2**40)
        try:
            measured = measure(params, work / "shards", work / "prepared", args.rounds, args.wait_idle, cache)
            memory = node_cache_memory(urls["train"], cache, args.workers)
        finally:
            cache.clear()
        rgb = measure_rgb(args, params, work / "prepared", work) if args.rgb_images else None
        uses = "cached" if node_cache(manifest, "", urls, params.train.cache_mb) else "streamed"

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
        "pipeline_uses": uses,
        "target_ratio": TARGET,
        "rows": rows,
        "node_cache_memory": memory,
        "rgb_64": rgb,
    }
    print(json.dumps(result, indent=2))
    for name in ("streamed", "cached"):
        print(
            f"{rows[name]['target']}  {name} loader {rows[name]['ratio_vs_tensordataset']:.2f}x TensorDataset "
            f"(target >= {TARGET}x)"
        )
    print(
        f"node cache: {memory['workers']} workers hold {memory['shared_mib']:,.0f} MiB of training images between "
        f"them, {memory['ratio_shared_vs_copied']:.2f}x the {memory['copied_mib']:,.0f} MiB of one copy each"
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
