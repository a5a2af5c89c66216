"""Data larger than memory: prepare + shard peak memory at N and 10·N images, and shard throughput on Ray.

MNIST's 70,000 real digits (train + t10k) are written as 28x28 grey PNG files, one sub-folder per class: the 10·N
image folder; the first N = 7,000 of them (the same order) are the N folder. Then:

    memory      for each folder, a fresh child process runs the pipeline's prepare and shard stages (shards written
                in that process, one after another) and reports its peak resident memory (getrusage ru_maxrss);
                the figure is the 10·N run's peak over the N run's (target <= 1.3x: memory does not grow with the
                number of images; prepare keeps an index, each shard job holds only its own images)
    throughput  the 10·N folder prepared and sharded with Ray tasks (the stages' `ray_tasks`: prepare's image
                checks, shard's shards) on a fresh local Ray with 1 CPU, then with 2 (one task at a time vs two);
                images/s of each, after one untimed warm-up pass that starts the workers; the figure is shard's
                2 tasks over 1 (target >= 1.6x on 2 cores); prepare's ratio is shown beside it

    .venv/bin/python benchmarks/data_scale.py --data ../shared/data/mnist
    .venv/bin/python benchmarks/data_scale.py --quick      # 2,000 / 20,000 images; writes only with --out

Writes benchmarks/results/data_scale.json (or --out). Exits non-zero only on errors, never on a missed target.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import provenance, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MEMORY_TARGET = 1.3  # peak RSS at 10·N over peak RSS at N
SPEEDUP_TARGET = 1.6  # shard images/s with 2 Ray tasks over 1
MAXCOUNT = 500  # images per shard (params.yaml's shard.maxcount)


def write_folder(data: Path, root: Path, limit: int) -> int:
    """The first `limit` MNIST images (train, then t10k) as `root/<digit>/<index>.png`; how many."""
    from PIL import Image

    from latentzoo.data.sources import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

    images = np.concatenate([read_idx(data / f"{p}-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC) for p in ("train", "t10k")])
    labels = np.concatenate([read_idx(data / f"{p}-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC) for p in ("train", "t10k")])
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images[:limit], labels[:limit], strict=True)):
        Image.fromarray(image).save(root / str(label) / f"{i:05d}.png")
    return min(limit, len(images))


def data_params(folder: Path):
    from latentzoo.config import DataConfig

    return DataConfig(source="imagefolder", path=str(folder))


def child_memory(folder: Path, work: Path) -> dict:
    """prepare + shard in this process: seconds of each and the peak RSS (MiB)."""
    from latentzoo.data.prepare import prepare
    from latentzoo.data.shards import write_shards

    start = time.perf_counter()
    info = prepare(data_params(folder), 0, work / "prepared")
    prepared_s = time.perf_counter() - start
    write_shards(work / "prepared", work / "shards", MAXCOUNT, progress=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    images = sum(info["counts"].values())
    return {
        "images": images,
        "prepare_s": prepared_s,
        "shard_s": time.perf_counter() - start - prepared_s,
        "peak_rss_mib": peak_mib,
    }


def child_throughput(folder: Path, work: Path, cpus: int) -> dict:
    """prepare (its image checks) and shard (its shards) as Ray tasks on a local Ray of `cpus` CPUs: a warm-up
    pass of both, then a timed one of each."""
    from latentzoo.data.prepare import prepare
    from latentzoo.data.shards import write_shards
    from latentzoo.stages.tasks import ray_tasks
    from latentzoo.training.cluster import connect_ray

    connect_ray(num_cpus=cpus)
    prepare(data_params(folder), 0, work / "warm-up-prepared", mapper=ray_tasks)
    write_shards(work / "warm-up-prepared", work / "warm-up", MAXCOUNT, progress=False, mapper=ray_tasks)
    start = time.perf_counter()
    info = prepare(data_params(folder), 0, work / "prepared", mapper=ray_tasks)
    prepare_s = time.perf_counter() - start
    write_shards(work / "prepared", work / "timed", MAXCOUNT, progress=False, mapper=ray_tasks)
    seconds = time.perf_counter() - start - prepare_s
    images = sum(info["counts"].values())
    return {
        "cpus": cpus,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "prepare_s": prepare_s,
        "prepare_images_per_s": images / prepare_s,
    }


def in_child(*args: str) -> dict:
    """Run this script's `--child` mode in a fresh Python; its JSON line."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"data_scale child {args} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--small", type=int, default=7000, help="N: images in the small folder (the large has 10·N)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 2,000, marked smoke")
    ap.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/data_scale.json; none with --quick)"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        result = (
            child_memory(Path(rest[0]), Path(rest[1]))
            if mode == "memory"
            else child_throughput(Path(rest[0]), Path(rest[1]), int(rest[2]))
        )
        print(json.dumps(result))
        return 0
    if args.quick:
        args.small = 2000

    with tempfile.TemporaryDirectory(prefix="lz-data-scale-") as d:
        work = Path(d)
        sizes = {"N": args.small, "10N": 10 * args.small}
        folders = {name: work / f"folder_{name}" for name in sizes}
        written = {name: write_folder(Path(args.data), folders[name], n) for name, n in sizes.items()}
        memory = {name: in_child("memory", str(folders[name]), str(work / f"mem_{name}")) for name in sizes}
        throughput = {
            f"{cpus}_task{'s' if cpus > 1 else ''}": in_child(
                "throughput", str(folders["10N"]), str(work / f"ray_{cpus}"), str(cpus)
            )
            for cpus in (1, 2)
        }
    memory_ratio = memory["10N"]["peak_rss_mib"] / memory["N"]["peak_rss_mib"]
    speedup = throughput["2_tasks"]["images_per_s"] / throughput["1_task"]["images_per_s"]
    prepare_speedup = throughput["2_tasks"]["prepare_images_per_s"] / throughput["1_task"]["prepare_images_per_s"]
    result = {
        **provenance(),
        "smoke": args.quick,
        "command": " ".join(["python", "benchmarks/data_scale.py", *sys.argv[1:]]),
        "images": written,
        "maxcount": MAXCOUNT,
        "memory": memory,
        "memory_ratio": memory_ratio,
        "memory_target": f"<= {MEMORY_TARGET}x: {'PASS' if memory_ratio <= MEMORY_TARGET else 'FAIL'}",
        "throughput": throughput,
        "speedup": speedup,
        "speedup_target": f">= {SPEEDUP_TARGET}x: {'PASS' if speedup >= SPEEDUP_TARGET else 'FAIL'}",
        "prepare_speedup": prepare_speedup,
    }
    print(json.dumps({k: result[k] for k in ("images", "memory", "memory_ratio", "throughput", "speedup")}, indent=1))
    if args.out or not args.quick:
        print("wrote", write_result("data_scale", result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
