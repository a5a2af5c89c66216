"""One quantiser layer, forward + backward, ours against vector-quantize-pytorch's, measured in the same run.

For every (implementation, codebook size K) N random vectors of dim D (default 4,096 x 64) go through the
layer in training mode and back (loss = sum(quantized * fixed random weights) + the layer's own losses):

    ours_vq       latentzoo VectorQuantizer (learnable codebook, nn.Parameter `embed`), chunk_size=--chunk-size
    theirs_vq     vector_quantize_pytorch.VectorQuantize(learnable_codebook=True, ema_update=False,
                  commitment_weight=0.25), otherwise defaults (so rotation_trick=True)
    ours_simvq    latentzoo SimVQ, chunk_size=--chunk-size
    theirs_simvq  vector_quantize_pytorch.SimVQ(dim, K), defaults (rotation_trick=True)

Each measurement runs in a fresh subprocess of this script (torch threads = --threads): one warm-up step, then
at least --repeats timed steps (more for fast steps, until --min-time seconds), median reported. Extra peak
memory = peak RSS (getrusage ru_maxrss, after resetting the high-water mark through /proc/self/clear_refs)
after the timed steps minus RSS just before the first forward (module and inputs built). For ours the
code search alone (nearest_codes) and its matmuls alone (same chunks, no min/where) are timed as well.
FLOPs = 2 N K D, the distance matmul; GFLOP/s = FLOPs / time. Ours at the largest K is also run with every
--chunk-sizes value. Before each measurement the driver waits (--wait-idle) for the CPUs to be idle and records
how busy they were: other processes on the machine make the timings meaningless.

    .venv/bin/pip install vector-quantize-pytorch==1.32.0     # dev-only dependency of this script
    .venv/bin/python benchmarks/vq_speed.py                   # 512, 8192, 65536 codes (several minutes)
    .venv/bin/python benchmarks/vq_speed.py --quick           # tiny run, seconds

Prints a table and PASS/FAIL for the targets (largest K: ours >= 2x faster than theirs and <= 1 GiB extra
peak; smallest K: speedup >= --noise-floor), writes benchmarks/results/vq_speed.json (not with --quick, unless
--out is given). Exits non-zero only on errors, never on slowness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("ours_vq", "theirs_vq"), ("ours_simvq", "theirs_simvq"))
GIB_KIB = 1024 * 1024

# ---------------------------------------------------------------- one measurement (runs in a subprocess)


def build(impl: str, k: int, d: int, chunk: int):
    """(module, forward(z) -> (quantized, scalar loss of the layer), channel_last input?)."""
    if impl.startswith("ours"):
        from latentzoo.models.quantizer import SimVQ, VectorQuantizer

        cls = VectorQuantizer if impl == "ours_vq" else SimVQ
        module = cls(k, d, commitment_weight=0.25, chunk_size=chunk)

        def forward(z):
            q, _, losses = module(z)
            return q, sum(losses.values())

        return module, forward, False
    import vector_quantize_pytorch as vqp

    if impl == "theirs_vq":
        module = vqp.VectorQuantize(d, k, learnable_codebook=True, ema_update=False, commitment_weight=0.25)
    else:
        module = vqp.SimVQ(d, k)

    def forward(z):
        q, _, loss = module(z)
        return q, loss

    return module, forward, True


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def reset_peak() -> bool:
    """Peak RSS := current RSS (Linux >= 4.0), so the import of torch does not floor the peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn, repeats: int, min_time: float) -> list[float]:
    """Seconds of fn() after one warm-up call: `repeats` calls, more while the total is under min_time."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    n = min(200, max(repeats, int(min_time / max(warm, 1e-6)) + 1))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def search_only(module, flat, chunk: int, repeats: int, min_time: float) -> dict:
    """Ours: nearest_codes alone, and the same chunked addmm calls without the running min (a ceiling)."""
    from latentzoo.models.quantizer import nearest_codes

    with torch.no_grad():
        codebook = module.codebook.detach()
        search = statistics.median(timed(lambda: nearest_codes(flat, codebook, chunk), repeats, min_time))
        out = torch.empty(flat.shape[0], min(chunk, codebook.shape[0]))

        def mm_only():
            for start in range(0, codebook.shape[0], chunk):
                c = codebook[start : start + chunk]
                torch.addmm(c.pow(2).sum(1)[None], flat, c.t(), alpha=-2, out=out[:, : c.shape[0]])

        matmul = statistics.median(timed(mm_only, repeats, min_time))
    return {"search_s": search, "search_matmul_only_s": matmul}


def measure(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    n, d, k = cfg["n"], cfg["dim"], cfg["codebook_size"]
    module, forward, channel_last = build(cfg["impl"], k, d, cfg["chunk_size"])
    module.train()
    z = torch.randn(1, n, d) if channel_last else torch.randn(n, d)
    z.requires_grad_(True)
    w = torch.randn_like(z)

    def step():
        q, loss = forward(z)
        ((q * w).sum() + loss).backward()
        z.grad = None
        module.zero_grad(set_to_none=True)

    gc.collect()
    peak_reset = reset_peak()
    rss0 = rss_kib()
    ticks = cpu_ticks()
    times = timed(step, cfg["repeats"], cfg["min_time"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    others = others_busy(ticks, cpu_ticks())
    out = {
        **cfg,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "steps_timed": len(times),
        "rss_before_kib": rss0,
        "peak_rss_kib": peak,
        "extra_peak_mib": (peak - rss0) / 1024,
        "peak_reset": peak_reset,
        "flops": 2 * n * k * d,
        "others_cpu_busy_during": others,
    }
    if cfg["impl"].startswith("ours"):
        out.update(search_only(module, z.detach(), cfg["chunk_size"], cfg["repeats"], cfg["min_time"]))
    return out


# ---------------------------------------------------------------- driver


def cpu_ticks() -> tuple[int, int, int]:
    """(all CPUs' ticks, their busy ticks, this process's ticks), from /proc/stat and /proc/self/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return sum(v), sum(v) - v[3] - v[4], int(own[11]) + int(own[12])  # idle + iowait are not busy


def others_busy(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Fraction of all CPUs that other processes kept busy between two cpu_ticks()."""
    total, busy, own = (a - b for a, b in zip(after, before))
    return max(0.0, busy - own) / max(total, 1)


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over `seconds` (other work on the machine skews timings)."""
    before = cpu_ticks()
    time.sleep(seconds)
    return others_busy(before, cpu_ticks())


def wait_idle(limit_s: float, threshold: float = 0.1) -> float:
    """Wait up to limit_s for the machine to be idle; the last busy fraction seen."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def run_one(args, impl: str, k: int, chunk: int) -> dict:
    """measure() in a fresh interpreter (its last stdout line is the JSON result), after waiting for an idle
    machine; measured again (up to --retries times) when other processes took CPU time during it."""
    cfg = {
        "impl": impl,
        "codebook_size": k,
        "n": args.n,
        "dim": args.dim,
        "chunk_size": chunk,
        "threads": args.threads,
        "repeats": args.repeats,
        "min_time": args.min_time,
    }
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    for attempt in range(args.retries + 1):
        before = wait_idle(args.wait_idle)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} K={k} chunk={chunk} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(gflops=res["flops"] / res["step_s"] / 1e9, others_cpu_busy_before=before, attempt=attempt)
        busy = max(before, res["others_cpu_busy_during"])
        note = f"  (other processes busy: {100 * busy:.0f}%)" if busy > 0.1 else ""
        print(
            f"  {impl:13s} K={k:6d} chunk={chunk:5d}  {res['step_s'] * 1e3:9.2f} ms  "
            f"+{res['extra_peak_mib']:8.1f} MiB{note}",
            flush=True,
        )
        if busy <= 0.1:
            break
    return res


def compare(rows: list[dict], args) -> tuple[list[dict], list[dict]]:
    """Speedups (theirs / ours, ours at --chunk-size) per size and pair, and the PASS/FAIL checks."""
    main = {
        (r["impl"], r["codebook_size"]): r
        for r in rows
        if r["chunk_size"] == args.chunk_size or r["impl"].startswith("theirs")
    }
    ratios, checks = [], []
    for k in args.sizes:
        for ours, theirs in PAIRS:
            o, t = main[(ours, k)], main[(theirs, k)]
            ratios.append(
                {
                    "codebook_size": k,
                    "ours": ours,
                    "theirs": theirs,
                    "speedup": t["step_s"] / o["step_s"],
                    "ours_extra_mib": o["extra_peak_mib"],
                    "theirs_extra_mib": t["extra_peak_mib"],
                }
            )
    big, small = max(args.sizes), min(args.sizes)
    for r in ratios:
        if r["codebook_size"] == big:
            checks.append(
                {
                    "check": f"K={big} {r['ours']} >= 2x faster than {r['theirs']}",
                    "value": r["speedup"],
                    "pass": r["speedup"] >= 2.0,
                }
            )
            checks.append(
                {
                    "check": f"K={big} {r['ours']} extra peak <= 1024 MiB",
                    "value": r["ours_extra_mib"],
                    "pass": r["ours_extra_mib"] <= 1024,
                }
            )
        if r["codebook_size"] == small and small != big:
            checks.append(
                {
                    "check": f"K={small} {r['ours']} no slower than {r['theirs']} (speedup >= {args.noise_floor})",
                    "value": r["speedup"],
                    "pass": r["speedup"] >= args.noise_floor,
                }
            )
    return ratios, checks


def best_chunk(rows: list[dict], k: int) -> dict:
    out = {}
    for impl in ("ours_vq", "ours_simvq"):
        runs = sorted((r for r in rows if r["impl"] == impl and r["codebook_size"] == k), key=lambda r: r["step_s"])
        out[impl] = {"best": runs[0]["chunk_size"], "step_s": {str(r["chunk_size"]): r["step_s"] for r in runs}}
    return out


def print_table(rows: list[dict], ratios: list[dict], checks: list[dict], chunks: dict) -> None:
    print(
        f"\n{'impl':13s} {'K':>6s} {'chunk':>6s} {'step ms':>9s} {'GFLOP/s':>8s} {'search ms':>10s} "
        f"{'mm-only ms':>10s} {'extra MiB':>10s} {'others%':>7s}"
    )
    for r in rows:
        s = (
            f"{r['search_s'] * 1e3:10.2f} {r['search_matmul_only_s'] * 1e3:10.2f}"
            if "search_s" in r
            else f"{'-':>10s} {'-':>10s}"
        )
        chunk = str(r["chunk_size"]) if r["impl"].startswith("ours") else "-"
        others = 100 * max(r["others_cpu_busy_before"], r["others_cpu_busy_during"])
        print(
            f"{r['impl']:13s} {r['codebook_size']:6d} {chunk:>6s} {r['step_s'] * 1e3:9.2f} {r['gflops']:8.1f} "
            f"{s} {r['extra_peak_mib']:10.1f} {others:7.0f}"
        )
    print(f"\n{'K':>6s} {'pair':28s} {'speedup':>8s} {'ours MiB':>9s} {'theirs MiB':>10s}")
    for r in ratios:
        print(
            f"{r['codebook_size']:6d} {r['ours'] + ' / ' + r['theirs']:28s} {r['speedup']:8.2f} "
            f"{r['ours_extra_mib']:9.1f} {r['theirs_extra_mib']:10.1f}"
        )
    print()
    for impl, c in chunks.items():
        times = ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in c["step_s"].items())
        print(f"best chunk for {impl}: {c['best']}  ({times})")
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}  ({c['value']:.2f})")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def machine_info(args) -> dict:
    import importlib.metadata as md
    import inspect

    from latentzoo.models.quantizer import VectorQuantizer

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vector_quantize_pytorch": md.version("vector-quantize-pytorch"),
        "threads": args.threads,
        "latentzoo_default_chunk_size": inspect.signature(VectorQuantizer).parameters["chunk_size"].default,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 8192, 65536])
    ap.add_argument("--n", type=int, default=4096, help="vectors per step")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=1024, help="ours, in the main comparison (the models' default)")
    ap.add_argument(
        "--chunk-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[512, 2048, 4096],
        help="ours at the largest size",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps at least")
    ap.add_argument("--min-time", type=float, default=1.0, help="timed seconds at least (up to 200 steps)")
    ap.add_argument("--noise-floor", type=float, default=0.9, help="'no slower' means speedup >= this")
    ap.add_argument("--wait-idle", type=float, default=300, help="seconds to wait for an idle machine per run")
    ap.add_argument("--retries", type=int, default=2, help="re-measurements of a run disturbed by other processes")
    ap.add_argument("--quick", action="store_true", help="tiny run: K 256,2048; N 1024; chunks 256,1024")
    ap.add_argument("--out", help="JSON file (default benchmarks/results/vq_speed.json; none with --quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.quick:
        args.sizes, args.n, args.chunk_size, args.chunk_sizes = [256, 2048], 1024, 1024, [256, 1024]
        args.repeats, args.min_time = 2, 0.2

    t0 = time.perf_counter()
    rows = []
    for k in args.sizes:
        for impl in ("ours_vq", "theirs_vq", "ours_simvq", "theirs_simvq"):
            rows.append(run_one(args, impl, k, args.chunk_size))
    big = max(args.sizes)
    for chunk in sorted(set(args.chunk_sizes) - {args.chunk_size}):
        for impl in ("ours_vq", "ours_simvq"):
            rows.append(run_one(args, impl, big, chunk))
    ratios, checks = compare(rows, args)
    chunks = best_chunk(rows, big)
    print_table(rows, ratios, checks, chunks)

    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    disturbed = [r for r in rows if max(r["others_cpu_busy_before"], r["others_cpu_busy_during"]) > 0.1]
    if disturbed:
        print(
            f"\nWARNING: other processes used the CPUs during {len(disturbed)} of {len(rows)} runs: timings are "
            "unreliable (see others%)"
        )
    result = {
        "machine": machine_info(args),
        "settings": settings,
        "runs_disturbed": len(disturbed),
        "runs": rows,
        "speedups": ratios,
        "best_chunk_at_largest_size": chunks,
        "checks": checks,
        "wall_s": time.perf_counter() - t0,
    }
    out = args.out or (None if args.quick else ROOT / "benchmarks/results/vq_speed.json")
    if out:
        from results_io import write_result

        import latentzoo.models.quantizer  # noqa: F401  (measured in worker processes: hash its source here too)

        write_result("vq_speed", result, out)
    print(f"\n{f'wrote {out}' if out else 'not written (--quick)'} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
