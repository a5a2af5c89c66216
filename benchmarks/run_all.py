"""The speed benchmarks in one command, then benchmarks/results.md from every JSON in benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py                     # the suite (about 30 min on 2 cores), results.md
    .venv/bin/python benchmarks/run_all.py --quick             # smoke run, small sizes, into a temp dir
    .venv/bin/python benchmarks/run_all.py --skip repro_timing --skip vq_speed
    .venv/bin/python benchmarks/run_all.py --report-only       # re-render results.md, run nothing

In sequence, each in its own process (a failing one does not stop the others):

    loader_speed  the pipeline's WebDataset loader (streamed, cached) vs TensorDataset + DataLoader
    vae_mnist     Ray Train 1 worker vs a plain PyTorch loop, and 2 vs 1 workers (plus the VAE's test -ELBO)
    vq_speed      our quantizers vs vector_quantize_pytorch's, one layer forward + backward
    repro_timing  `make repro` from a clean workspace, then the no-op `dvc repro`
    elastic_resize  seconds an elastic run ([1, 2] workers) loses when a node joins and when it goes
    data_scale    prepare + shard peak memory at N and 10·N images (PNG folder), shard images/s with 2 Ray tasks vs 1

Every figure in the tables is a ratio against a baseline measured in the same run. The report also shows the
quality benchmarks (vq_mnist, tune_mnist, stacked_mnist, resvae_mnist) from their JSON files, which this
suite does not re-run. --quick writes its JSON files and results.md into --results-dir (default: a new temp
dir), never into benchmarks/results/. Exits non-zero when a benchmark failed (an error), never on slowness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
REPORT = BENCH / "results.md"
sys.path.insert(0, str(BENCH))

from results_io import differs, mean_std, stale_sources, summary  # noqa: E402

VAE_NLL_TARGET = 87.0  # nats: #22's VAE target, better than pythae's VAE (89.78), toward VampPrior (85.6)


@dataclass
class Step:
    name: str  # also the script (benchmarks/<name>.py) and its JSON (<name>.json)
    full: list[str]
    quick: list[str]
    has_out: bool = True  # takes --out FILE; otherwise it writes benchmarks/results/<name>.json itself


def suite(data: str, quick_data: str | None) -> list[Step]:
    return [
        Step("loader_speed", ["--data", data], ["--data", data, "--quick"]),
        # The README's run: the speed ratios and the 10-epoch test -ELBO it quotes.
        Step(
            "vae_mnist",
            ["--data", data, "--epochs", "10", "--workers", "2"],
            ["--data", str(quick_data), "--epochs", "2", "--workers", "2", "--baseline-epochs", "1"],
            has_out=False,
        ),
        Step("vq_speed", [], ["--quick"]),
        Step("repro_timing", [], ["--quick"]),
        Step("elastic_resize", [], []),
        Step("data_scale", ["--data", data], ["--data", data, "--quick"]),
    ]


# ---------------------------------------------------------------- running


def subset_idx(src: Path, dest: Path, counts: dict[str, int]) -> Path:
    """The first counts[prefix] images and labels of src's IDX files (train, t10k), written to dest (.gz)."""
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, n in counts.items():
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            path = src / f"{prefix}-{kind}"
            raw = path.read_bytes() if path.exists() else gzip.decompress(Path(f"{path}.gz").read_bytes())
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            item = len(raw[4 + 4 * ndim :]) // dims[0]
            header = raw[:4] + min(n, dims[0]).to_bytes(4, "big") + raw[8 : 4 + 4 * ndim]
            body = raw[4 + 4 * ndim : 4 + 4 * ndim + min(n, dims[0]) * item]
            (dest / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(header + body, compresslevel=1))
    return dest


def stamp(json_file: Path, command: list[str], wall_s: float, smoke: bool) -> None:
    """Record in a result what produced it (when its script does not), and whether it was a smoke run."""
    result = json.loads(json_file.read_text())
    result.setdefault("command", shlex.join(command))
    result.setdefault("date", dt.datetime.now().isoformat(timespec="seconds"))
    result["smoke"] = result.get("smoke") or smoke
    result["suite_step_wall_s"] = wall_s
    json_file.write_text(json.dumps(result, indent=2) + "\n")


def run_step(step: Step, quick: bool, results_dir: Path) -> tuple[int, float]:
    """Run one benchmark (its output streams through); (exit code, seconds). Its JSON lands in results_dir."""
    out = results_dir / f"{step.name}.json"
    command = ["python", f"benchmarks/{step.name}.py", *(step.quick if quick else step.full)]
    command += ["--out", str(out)] if step.has_out else []
    redirected = not step.has_out and results_dir.resolve() != RESULTS.resolve()
    default = RESULTS / f"{step.name}.json"
    saved = default.read_bytes() if redirected and default.exists() else None
    print(f"\n=== {step.name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.call([sys.executable, *command[1:]], cwd=ROOT)
    finally:
        # A script without --out writes benchmarks/results/<name>.json: move that to results_dir and put the
        # real result back, so a smoke run never replaces a measurement.
        if redirected and default.exists() and default.read_bytes() != saved:
            shutil.move(default, out)
        if saved is not None and not default.exists():
            default.write_bytes(saved)
    wall = time.perf_counter() - start
    if rc == 0 and out.exists():
        stamp(out, command, wall, quick)
    print(f"=== {step.name}: exit {rc} after {wall:.0f} s", flush=True)
    return rc, wall


# ---------------------------------------------------------------- report (reads JSON only)


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def ratio(value) -> str:
    return fmt(value, ".2f", "×")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def shown(path: Path) -> str:
    """`path` relative to the repo when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine_text(result: dict) -> str | None:
    """'2 CPUs, no GPU; torch 2.13.0, ray 2.60.0' from what the JSON records."""
    machine, versions = result.get("machine") or {}, result.get("versions") or {}
    if not machine and not versions:
        return None
    parts = []
    if machine.get("cpus"):
        parts.append(f"{machine['cpus']} CPUs, {machine.get('gpu') or 'no GPU'}")
    parts += [f"{k} {v}" for k, v in versions.items() if k != "python"]
    return ", ".join(parts)


def source_line(name: str, result: dict, settings: tuple[str, ...] = ()) -> str:
    """Where a table comes from: the file, command, date, commit and machine the JSON records, and whether the code
    that produced it changed since (`results_io.stale_sources`)."""
    parts = [f"`{name}.json`"]
    date = result.get("date") or (result.get("machine") or {}).get("date")
    if result.get("command"):
        parts.append(f"`{result['command']}`")
    if date:
        parts.append(date)
    if result.get("commit"):
        parts.append(f"commit {result['commit'][:12]}{'+dirty' if result['commit'].endswith('+dirty') else ''}")
    if machine_text(result):
        parts.append(machine_text(result))
    recorded = [f"{key} {result[key]}" for key in settings if result.get(key) is not None]
    if recorded:
        parts.append("settings: " + ", ".join(recorded))
    if not result.get("command") and not date:
        parts.append("(command and date not recorded)")
    for earlier in result.get("earlier_runs", []):  # rows an earlier run measured with the same code (--append)
        parts.append(f"with rows from `{earlier['command']}`, {earlier['date']}, commit {earlier['commit'][:12]}")
    line = "Source: " + "; ".join(parts) + "."
    stale = stale_sources(result)
    if stale is None:
        line += " **Freshness unknown: no source hashes recorded (measured before they were).**"
    elif stale:
        shown_files = ", ".join(f"`{p}`" for p in stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        line += f" **Stale: {shown_files} changed since this was measured.**"
    if result.get("smoke"):
        line += " **Smoke run (small sizes): not a measurement.**"
    if result.get("note"):
        line += f" Note: {result['note']}."
    return line


def loader_section(name: str, r: dict) -> list[str]:
    rows = r["rows"]
    target = r.get("target_ratio", 0.8)
    lines = table(
        ["loader (1 worker rank)", "vs TensorDataset", "images/s", f"target ≥ {target}×"],
        [
            [
                "TensorDataset + DataLoader (shuffle; baseline)",
                ratio(1.0),
                fmt(rows["tensordataset"]["images_per_s"], ",.0f"),
                "–",
            ],
            *[
                [
                    f"`train_batches`, {kind}" + (" (the pipeline's)" if r.get("pipeline_uses") == kind else ""),
                    ratio(rows[kind]["ratio_vs_tensordataset"]),
                    fmt(rows[kind]["images_per_s"], ",.0f"),
                    rows[kind]["target"],
                ]
                for kind in ("streamed", "cached")
                if kind in rows
            ],
        ],
    )
    notes = [
        f"{fmt(r.get('train_images'), ',')} training images, batch {r.get('batch_size')}, {r.get('shards')} "
        f"shards, median of {r.get('rounds')} epoch(s) each."
    ]
    if "first_epoch_images_per_s" in rows.get("cached", {}):
        notes.append(
            f"The cached loader's first epoch (decoding every shard into the node cache) ran at "
            f"{rows['cached']['first_epoch_images_per_s']:,.0f} images/s."
        )
    memory = r.get("node_cache_memory")
    if memory:
        notes.append(
            f"Node memory of the cache: {memory['workers']} worker processes holding every training image take "
            f"{memory['shared_mib']:,.0f} MiB between them from the node cache (mapped in {memory['cache_folder']}), "
            f"{memory['ratio_shared_vs_copied']:.2f}× the {memory['copied_mib']:,.0f} MiB of one decoded copy each "
            "(sum of their PSS growth)."
        )
    if (r.get("others_cpu_busy") or 0) > 0.1:
        notes.append(f"Other processes kept {100 * r['others_cpu_busy']:.0f}% of the CPUs busy: timings disturbed.")
    rgb = r.get("rgb_64")
    if not rgb:
        return [*lines, "", " ".join(notes)]
    floor = table(
        ["64×64 RGB (PNG image folder, sharded)", "vs decode floor", "images/s", f"target ≥ {target}×"],
        [
            [
                f"decode floor: {rgb['png_decode_per_core_per_s']:,.0f} PNG/s on one core × {rgb['cores']} cores",
                ratio(1.0),
                fmt(rgb["decode_floor_per_s"], ",.0f"),
                "–",
            ],
            [
                "`train_batches`, streamed",
                ratio(rgb["ratio_vs_decode_floor"]),
                fmt(rgb["streamed_per_s"], ",.0f"),
                rgb["target"],
            ],
        ],
    )
    return [*lines, "", " ".join(notes), "", *floor, "", f"{rgb['train_images']:,} training images of 3×64×64."]


def vae_speed_section(name: str, r: dict) -> list[str]:
    workers, per_worker = r.get("workers", 1), r.get("torch_threads_per_worker")
    cpus = r.get("cpus") or (per_worker * workers if per_worker else None)
    plain = r["plain_pytorch_epoch_s"]
    lines = table(
        ["training loop (VAE, same global batch)", "vs plain PyTorch (epoch time)", "s / epoch"],
        [
            ["plain PyTorch loop, in-memory tensors (baseline)", ratio(1.0), fmt(plain, ".1f")],
            [
                "Ray Train, 1 worker",
                ratio(r.get("ray_1worker_over_plain_epoch_ratio")),
                fmt(r.get("ray_1worker_train_epoch_s"), ".1f"),
            ],
        ],
    )
    lines += [
        "",
        f"Optimisation time per epoch after the first; below 1× is faster. Ray start-up and per-run overhead "
        f"outside the epochs, reported apart: {fmt(r.get('ray_startup_and_overhead_s'), '.1f')} s "
        f"(the {workers}-worker run).",
    ]
    if workers > 1 and r.get("ray_1worker_train_epoch_s"):
        one, many = r["ray_1worker_train_epoch_s"], r["ray_train_epoch_s_steady"]
        lines += [
            "",
            *table(
                ["Ray Train workers (DDP)", "vs 1 worker (epoch time)", "s / epoch", "torch threads per worker"],
                [
                    ["1 (baseline)", ratio(1.0), fmt(one, ".1f"), cpus or "all cores"],
                    [str(workers), ratio(many / one), fmt(many, ".1f"), fmt(per_worker, "d")],
                ],
            ),
        ]
        if cpus:
            lines += ["", f"On {cpus} CPU core(s)."]
    return lines


def vq_speed_section(name: str, r: dict) -> list[str]:
    chunk = (r.get("settings") or {}).get("chunk_size")
    step = {
        (run["impl"], run["codebook_size"]): run
        for run in r.get("runs", [])
        if run["impl"].startswith("theirs") or run.get("chunk_size") == chunk
    }
    rows = []
    for s in r["speedups"]:
        k = s["codebook_size"]
        ours, theirs = step.get((s["ours"], k), {}), step.get((s["theirs"], k), {})
        ms = [run["step_s"] * 1000 if "step_s" in run else None for run in (ours, theirs)]
        rows.append(
            [
                f"{k:,}",
                f"{s['ours']} vs {s['theirs']}",
                ratio(s["speedup"]),
                fmt(ms[0], ",.1f"),
                fmt(ms[1], ",.1f"),
                fmt(s["ours_extra_mib"], ",.0f"),
                fmt(s["theirs_extra_mib"], ",.0f"),
            ]
        )
    lines = table(
        [
            "K",
            "layer",
            "speed-up vs vector_quantize_pytorch",
            "ours ms/step",
            "theirs ms/step",
            "ours +MiB",
            "theirs +MiB",
        ],
        rows,
    )
    checks = r.get("checks", [])
    failed = [c["check"] for c in checks if not c["pass"]]
    settings = r.get("settings") or {}
    lines += [
        "",
        f"{settings.get('n', '?')} vectors of dim {settings.get('dim', '?')}, forward + backward, "
        f"{settings.get('threads', '?')} torch threads; speed-up = their step time / ours. Targets: "
        f"{len(checks) - len(failed)}/{len(checks)} PASS"
        + (f"; FAIL: {'; '.join(failed)}" if failed else "")
        + f"; runs disturbed by other processes: {r.get('runs_disturbed', '?')}.",
    ]
    return lines


def repro_section(name: str, r: dict) -> list[str]:
    target = r.get("target_s", 600)
    clean, noop = r["clean"], r.get("noop")
    rows = [
        [
            "clean workspace",
            ratio(1.0),
            ratio(clean["wall_s"] / target),
            fmt(clean["wall_s"], ".0f"),
            clean["stages_run"],
            r.get("target", "–"),
        ]
    ]
    if noop:
        rows.append(
            [
                "no-op, right after",
                ratio(r.get("noop_over_clean")),
                ratio(noop["wall_s"] / target),
                fmt(noop["wall_s"], ".0f"),
                noop["stages_run"],
                "up to date" if noop.get("up_to_date") else "–",
            ]
        )
    lines = table(
        [
            "`make repro` (local_cluster + dvc repro)",
            "vs clean",
            f"vs {target:.0f} s target",
            "wall s",
            "stages run",
            f"≤ {target:.0f} s",
        ],
        rows,
    )
    notes = []
    if clean.get("ray_head_ready_s") is not None:
        notes.append(f"The local Ray head was up after {clean['ray_head_ready_s']:.0f} s (each run starts one).")
    stages = sorted(clean.get("stage_s", {}).items(), key=lambda kv: -kv[1])
    if stages:
        notes.append(
            "Per stage (s, from its `Running stage` line to the next): "
            + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in stages)
            + "."
        )
    return lines + (["", " ".join(notes)] if notes else [])


def data_scale_section(name: str, r: dict) -> list[str]:
    small, large = r["memory"]["N"], r["memory"]["10N"]
    one, two = r["throughput"]["1_task"], r["throughput"]["2_tasks"]
    memory = table(
        ["prepare + shard, image folder (PNG)", "peak RSS vs N", "peak RSS MiB", "prepare s", "shard s", "target"],
        [
            [
                f"N = {small['images']:,} images",
                ratio(1.0),
                fmt(small["peak_rss_mib"], ".0f"),
                fmt(small["prepare_s"], ".1f"),
                fmt(small["shard_s"], ".1f"),
                "–",
            ],
            [
                f"10·N = {large['images']:,} images",
                ratio(r["memory_ratio"]),
                fmt(large["peak_rss_mib"], ".0f"),
                fmt(large["prepare_s"], ".1f"),
                fmt(large["shard_s"], ".1f"),
                r["memory_target"],
            ],
        ],
    )
    if "prepare_images_per_s" in one:
        prepare_rows = [
            [
                "1 task at a time (1 CPU)",
                ratio(1.0),
                fmt(one["prepare_images_per_s"], ",.0f"),
                fmt(one["prepare_s"], ".1f"),
                "–",
            ],
            [
                "2 tasks at a time (2 CPUs)",
                ratio(r["prepare_speedup"]),
                fmt(two["prepare_images_per_s"], ",.0f"),
                fmt(two["prepare_s"], ".1f"),
                "–",
            ],
        ]
        memory += [""] + table(
            ["prepare stage on Ray (image checks), 10·N images", "vs 1 task", "images/s", "s", "target"], prepare_rows
        )
    speed = table(
        ["shard stage on Ray, 10·N images", "vs 1 task", "images/s", "s", "target"],
        [
            ["1 task at a time (1 CPU)", ratio(1.0), fmt(one["images_per_s"], ",.0f"), fmt(one["seconds"], ".1f"), "–"],
            [
                "2 tasks at a time (2 CPUs)",
                ratio(r["speedup"]),
                fmt(two["images_per_s"], ",.0f"),
                fmt(two["seconds"], ".1f"),
                r["speedup_target"],
            ],
        ],
    )
    return memory + [""] + speed


def elastic_section(name: str, r: dict) -> list[str]:
    """Seconds and epochs (at 1 worker, measured in the same run) lost per resize of an elastic run."""
    base = r["epoch_s_1_worker"]
    rows = [
        ["epoch at 1 worker (baseline)", ratio(1.0), fmt(base, ".2f"), "–"],
        ["epoch at 2 workers", ratio(r["epoch_s_2_workers"] / base), fmt(r["epoch_s_2_workers"], ".2f"), "–"],
        ["grow: node up → first step at 2 workers", ratio(r["grow_s"] / base), fmt(r["grow_s"], ".1f"), "–"],
        [
            "shrink: node stopped → first step at 1 worker",
            ratio(r["shrink_s"] / base) if r["shrink_s"] is not None else "no shrink",
            fmt(r["shrink_s"], ".1f"),
            "yes" if r.get("retried_old_size") else "no",
        ],
    ]
    if "reclaim_s" in r:  # a drained node (KubeRay's preStop hook), stopped before the drain's deadline
        rows += [
            [
                "reclaim notice: drain → mid-epoch checkpoint",
                ratio(r["notice_s"] / base),
                fmt(r["notice_s"], ".1f"),
                "–",
            ],
            [
                f"reclaim: drain's deadline ({r['drain_deadline_s']:g} s) → first step at 1 worker",
                ratio(r["reclaim_s"] / base),
                fmt(r["reclaim_s"], ".1f"),
                "yes" if r.get("reclaim_retried_old_size") else "no",
            ],
        ]
    lines = table(["event (`train.num_workers: [1, 2]`)", "vs a 1-worker epoch", "s", "retried the old size"], rows)
    settings = r["settings"]
    return lines + [
        "",
        f"Resize checks every {settings['elastic_resize_interval_s']:g} s; a restart at a size the cluster no longer "
        f"has waits `ray.worker_start_timeout_s` = {settings['worker_start_timeout_s']:g} s. {settings['model']}.",
        "Ray Train sizes a (re)started group by its autoscaling coordinator's view of the nodes, refreshed every 20 s: "
        "a node that just joined waits for it, and a node that just went is tried once more.",
    ]


def vae_quality_section(name: str, r: dict) -> list[str]:
    return table(
        ["epochs", "workers", "test −ELBO (nats)", "test PSNR (dB)", "train wall s"],
        [
            [
                r.get("epochs"),
                r.get("workers"),
                fmt(r.get("test_neg_elbo_nats"), ".1f"),
                fmt(r.get("test_psnr_db"), ".2f"),
                fmt(r.get("train_wall_s"), ".0f"),
            ]
        ],
    )


def vae_nll_section(name: str, r: dict) -> list[str]:
    """Mean ± std over seeds of −ELBO and the importance-sampled NLL, then the published anchors, each with the gap
    in units of our standard deviation."""
    nll = r["nll"]
    rows = [
        ["latentzoo VAE, −ELBO (1 sample)", mean_std(r["neg_elbo"]), "–"],
        [f"latentzoo VAE, NLL (k = {r['k']})", mean_std(nll), "–"],
    ]
    for label, value in r.get("anchors", {}).items():
        rows.append([label + " (published)", f"{value:.2f}", f"{nll['mean'] - value:+.2f}"])
    lines = table(["model", "test nats per image (lower is better)", "our NLL minus it"], rows)
    on_cpu = not (r.get("machine") or {}).get("gpu") and r.get("device", "cpu") == "cpu"
    passed = nll["mean"] <= VAE_NLL_TARGET and r["k"] >= 1000 and nll["n"] >= 3 and on_cpu
    verdict = "PASS" if passed else "FAIL"
    lines += ["", f"Target (#22): NLL ≤ {VAE_NLL_TARGET} nats, k ≥ 1,000, ≥ 3 seeds, trained on CPU: {verdict}."]
    return lines + vae_curve(r)


def vae_curve(r: dict) -> list[str]:
    """The learning curve the seeds recorded: −ELBO and NLL (the curve's own k, on its first test digits) by epoch,
    mean ± std over the seeds."""
    curves = [row.get("curve") or [] for row in r.get("rows", [])]
    epochs = sorted({point["epoch"] for curve in curves for point in curve})
    if not epochs:
        return []
    setting = r.get("curve", {})

    def at(epoch: int, key: str) -> str:
        return mean_std(summary([p[key] for curve in curves for p in curve if p["epoch"] == epoch]))

    rows = [[epoch, at(epoch, "neg_elbo"), at(epoch, "nll")] for epoch in epochs]
    head = f"Learning curve (first {setting.get('images', '?')} test digits, k = {setting.get('k', '?')}):"
    return ["", head, "", *table(["epoch", "test −ELBO", "test NLL"], rows)]


def vq_mnist_section(name: str, r: dict) -> list[str]:
    """Utilisation (mean ± std over seeds) per variant and K; older files without a summary show their one run."""
    found = r.get("summary") or [
        {"variant": row["variant"], "codebook_size": row["codebook_size"], "utilisation": summary([row["utilisation"]])}
        for row in r["rows"]
    ]
    by = {(s["variant"], s["codebook_size"]): s for s in found}
    variants = list(dict.fromkeys(s["variant"] for s in found))
    first = r["rows"][0]
    rows = []
    for k in sorted({s["codebook_size"] for s in found}):
        cells = [mean_std(scaled(by[(v, k)]["utilisation"], 100), ".1f") if (v, k) in by else "–" for v in variants]
        rows.append([f"{k:,}", *cells])
    lines = table(["K", *[f"{v} (% used)" for v in variants]], rows)
    budget = f"{first.get('train_images', '?')} images × {first.get('epochs', '?')} epochs"
    if "summary" not in r:  # one seed, targets judged without intervals: do not repeat its verdicts
        return lines + ["", f"Test-split codebook utilisation ({budget}). Targets: not judged (one seed)."]
    targets = r.get("targets", [])
    counts = {word: sum(t.startswith(word) for t in targets) for word in ("PASS", "FAIL", "NOT MEASURED")}
    tally = ", ".join(f"{n} {word}" for word, n in counts.items() if n) or "none"
    lines += ["", f"Test-split codebook utilisation ({budget}). Targets: {tally}.", *targets_list(targets)]
    return lines + vq_curves(r["rows"], variants)


def vq_curves(rows: list[dict], variants: list[str]) -> list[str]:
    """Per K with a curve of more than one epoch: % of codes used on the test split after each epoch, mean ± std
    over the seeds, one column per variant."""
    lines = []
    for k in sorted({row["codebook_size"] for row in rows}):
        curves = {
            v: [row.get("curve") or [] for row in rows if (row["variant"], row["codebook_size"]) == (v, k)]
            for v in variants
        }
        curves = {v: c for v, c in curves.items() if c and all(len(curve) > 1 for curve in c)}
        epochs = sorted({point["epoch"] for c in curves.values() for curve in c for point in curve})
        if epochs:
            cells = [[epoch, *[used_at(c, epoch) for c in curves.values()]] for epoch in epochs]
            head = ["epoch", *[f"{v} (% used)" for v in curves]]
            lines += ["", f"Codes used after each epoch, K = {k:,}:", "", *table(head, cells)]
    return lines


def used_at(curves: list[list[dict]], epoch: int) -> str:
    values = [point["utilisation"] * 100 for curve in curves for point in curve if point["epoch"] == epoch]
    return mean_std(summary(values), ".1f") if values else "–"


def scaled(s: dict, factor: float) -> dict:
    return {**s, "mean": s["mean"] * factor, "std": s["std"] * factor}


def targets_list(targets: list[str]) -> list[str]:
    return ["", *[f"- {t}" for t in targets]] if targets else []


def over_runs(runs: list[dict], key: str) -> dict | None:
    """summary() of one figure over a benchmark's runs (seeds); None when a run lacks it."""
    values = [run.get(key) for run in runs]
    return summary(values) if values and None not in values else None


def verdict(a: dict | None, b: dict | None, lower_is_better: bool = True) -> str:
    """How `a` compares with `b`: 'better' or 'worse' only when the intervals do not overlap."""
    if not a or not b:
        return "–"
    if a["n"] < 2 or b["n"] < 2:
        return "not judged (one seed)"
    if not differs(a, b):
        return "no difference"
    return "better" if (a["mean"] < b["mean"]) == lower_is_better else "worse"


SIMVQ_CODE_FIGURES = [  # (figure, label, scale, format)
    ("used", "codes used (%)", 100, ".1f"),
    ("w_rank", "effective rank of W", 1, ".1f"),
    ("latent_rank", "effective rank of the test latents", 1, ".1f"),
    ("radius_used", "‖e − z̄‖ of used codes (latent spreads)", 1, ".2f"),
    ("radius_unused", "‖e − z̄‖ of unused codes (latent spreads)", 1, ".2f"),
    ("gap_used", "used code to its nearest latent (latent spreads)", 1, ".3f"),
    ("gap_unused", "unused code to its nearest latent (latent spreads)", 1, ".3f"),
]


def simvq_codes_section(name: str, r: dict) -> list[str]:
    """Per K: the figures of benchmarks/simvq_codes.py (mean ± std over the seeds), then the codes unused in each
    tenth of the codebook sorted by distance from the latents' mean."""
    lines = []
    for s in r["summary"]:
        rows = [[label, mean_std(scaled(s[f], scale), spec)] for f, label, scale, spec in SIMVQ_CODE_FIGURES]
        tenths = [mean_std(scaled(t, 100), ".0f") for t in s["unused_by_radius"]]
        lines += [f"K = {s['codebook_size']:,}, test split:", "", *table(["figure", "mean ± std"], rows), ""]
        lines += ["Codes unused (%) in each tenth of the codebook, nearest the latents' mean first:", ""]
        lines += [*table([str(i) for i in range(1, 11)], [tenths]), ""]
    return lines[:-1]


def tune_section(name: str, r: dict) -> list[str]:
    """Per model, over seeds (an older file is one run): test objective with default and tuned weights, each seed's
    tuned weights, the search's throughput."""
    rows = []
    for model, m in r["models"].items():
        runs = m.get("runs") or [m]
        weights = "; ".join(
            f"{key} {runs[0]['default_weights'][key]:.3g} → "
            + " / ".join(f"{run['tuned_weights'][key]:.3g}" for run in runs)
            for key in runs[0]["tuned_weights"]
        )
        default, tuned = over_runs(runs, "test_default"), over_runs(runs, "test_tuned")
        rows.append(
            [
                model,
                mean_std(over_runs(runs, "test_tuned_over_default"), ".2f"),
                runs[0].get("metric"),
                weights,
                mean_std(default, ".4g"),
                mean_std(tuned, ".4g"),
                verdict(tuned, default),
                mean_std(over_runs(runs, "trials_per_hour"), ".0f"),
                mean_std(over_runs(runs, "seconds_per_trial"), ".0f"),
            ]
        )
    return table(
        [
            "model",
            "test tuned / default",
            "tuned on",
            "weights (default → tuned, per seed)",
            "test default",
            "test tuned",
            "tuned vs default",
            "trials / hour",
            "s / trial",
        ],
        rows,
    ) + ["", "Test objective (VAE −ELBO, VQ-VAE MSE): lower is better."]


def stacked_section(name: str, r: dict) -> list[str]:
    """Per label fraction, over seeds (an older file is one run): accuracy pretrained + fine-tuned, from random
    init, of the linear probe, and whether pretraining helped."""
    runs = r.get("runs") or [r]
    rows = []
    for fraction in sorted(runs[0]["by_fraction"], key=float):
        fractions = [run["by_fraction"][fraction] for run in runs]
        acc, rnd = over_runs(fractions, "test_accuracy"), over_runs(fractions, "test_accuracy_random")
        err = ratio((1 - acc["mean"]) / (1 - rnd["mean"])) if acc and rnd and rnd["mean"] != 1 else "–"
        labelled = fractions[0].get("labelled_images")
        rows.append(
            [
                f"{float(fraction):.0%}" + (f" ({labelled:,})" if labelled else ""),
                err,
                mean_std(acc and scaled(acc, 100), ".2f"),
                mean_std(rnd and scaled(rnd, 100), ".2f"),
                verdict(acc, rnd, lower_is_better=False),
                mean_std((probe := over_runs(fractions, "test_accuracy_probe")) and scaled(probe, 100), ".2f"),
            ]
        )
    lines = table(
        [
            "labels",
            "test error vs random init",
            "pretrained + fine-tuned (%)",
            "random init (%)",
            "pretrained vs random",
            "linear probe (%)",
        ],
        rows,
    )
    if target := r.get("target_all_labels"):
        lines += ["", f"Target ≥ {target['accuracy']:.1%} with all labels (mean over seeds): {target['verdict']}."]
    elif "target_all_labels_98_3" in r:
        lines += ["", f"Target ≥ 98.3% with all labels: {r['target_all_labels_98_3']}."]
    return lines


RESVAE_COLUMNS = [  # (figure, header, format)
    ("test_fid_samples", "FID samples (classifier features)", ".1f"),
    ("test_fid_recon", "FID recon", ".1f"),
    ("test_sharpness_samples", "sharpness samples (data = 1)", ".2f"),
    ("test_neg_elbo", "−ELBO", ".1f"),
    ("test_mse", "MSE", ".4f"),
    ("test_mean_sigma", "mean σ", ".3f"),
    ("test_collapsed_dims", "collapsed dims", ".1f"),
]


def resvae_section(name: str, r: dict) -> list[str]:
    """Each variant's figures as mean ± std over seeds, then each of the paper's claims and its verdict (called only
    when the intervals do not overlap)."""
    rows = []
    for variant, v in r["variants"].items():
        cells = [mean_std(v.get(key), spec) if isinstance(v.get(key), dict) else "–" for key, _, spec in RESVAE_COLUMNS]
        rows.append([variant, *cells])
    lines = table(["variant", *[header for _, header, _ in RESVAE_COLUMNS]], rows)
    claims = r.get("claims", [])
    if claims:
        lines += [
            "",
            *table(
                ["claim (arXiv 2309.13160)", "figure", "variant", "baseline", "verdict"],
                [
                    [
                        c["claim"],
                        c["figure"].removeprefix("test_"),
                        f"{c['variant']}: {mean_std(c['variant_value'])}",
                        f"{c['baseline']}: {mean_std(c['baseline_value'])}",
                        f"**{c['verdict']}**",
                    ]
                    for c in claims
                ],
            ),
        ]
    return lines


# (JSON name, title, renderer, settings worth printing); a name also matches <name>_<suffix>.json.
SPEED = [
    ("loader_speed", "Loader: WebDataset `train_batches` vs TensorDataset", loader_section, ()),
    (
        "vae_mnist",
        "Ray Train vs plain PyTorch, and 2 vs 1 workers",
        vae_speed_section,
        ("epochs", "workers", "global_batch_size"),
    ),
    ("vq_speed", "Quantizer layer vs vector_quantize_pytorch", vq_speed_section, ()),
    ("repro_timing", "`make repro`: clean and no-op", repro_section, ("params", "models", "epochs")),
    ("elastic_resize", "Elastic training: time lost per resize", elastic_section, ()),
    ("data_scale", "Data at scale: memory of prepare + shard, shard tasks on Ray", data_scale_section, ("maxcount",)),
]
QUALITY = [
    ("vae_nll", "VAE likelihood on dynamically binarised MNIST", vae_nll_section, ("epochs", "k", "seeds")),
    ("vae_mnist", "VAE on MNIST", vae_quality_section, ("epochs", "workers", "global_batch_size")),
    ("vq_mnist", "VQ codebook utilisation on MNIST", vq_mnist_section, ("device", "torch")),
    ("simvq_codes", "Which SimVQ codes go unused", simvq_codes_section, ("epochs", "train_images")),
    (
        "tune_mnist",
        "Tuned vs default loss weights",
        tune_section,
        ("train_images", "trials", "epochs_per_trial", "final_epochs", "cpus"),
    ),
    (
        "stacked_mnist",
        "Stacked autoencoder: pretrained vs random init",
        stacked_section,
        (
            "pretrain_epochs",
            "finetune_epochs",
            "dropout",
            "input_corruption",
            "max_shift",
            "weight_decay",
            "workers",
            "cpus",
            "device",
        ),
    ),
    (
        "resvae_mnist",
        "Residual VAE + PatchGAN vs VAE",
        resvae_section,
        ("train_images", "epochs", "seeds", "workers", "cpus"),
    ),
]


def render_report(results_dir: Path) -> str:
    """results.md from the JSON files in results_dir (reads nothing else, runs nothing)."""
    results, unreadable = {}, []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            unreadable.append(f"`{path.name}` ({err})")
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/run_all.py` from the JSON files in `{shown(results_dir)}/` (re-render "
        "with `--report-only`). Each speed figure is a ratio against a baseline measured in the same run, on "
        "the machine and date its source line gives. Details per benchmark: `benchmarks/README.md`.",
    ]
    used = set()
    for heading, sections in (("Speed", SPEED), ("Quality", QUALITY)):
        lines += ["", f"## {heading}"]
        for prefix, title, render, settings in sections:
            found = sorted(n for n in results if n == prefix or n.startswith(prefix + "_"))
            if not found and heading == "Speed":
                lines += [
                    "",
                    f"### {title}",
                    "",
                    f"Not measured yet (no `{prefix}.json`): `python benchmarks/run_all.py` runs it.",
                ]
            for name in found:
                used.add(name)
                suffix = name[len(prefix) + 1 :]
                lines += [
                    "",
                    f"### {title}" + (f" ({suffix})" if suffix else ""),
                    "",
                    source_line(name, results[name], settings),
                    "",
                ]
                try:
                    lines += render(name, results[name])
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                    lines.append(f"Could not render this file ({type(err).__name__}: {err}).")
    others = sorted(set(results) - used)
    if others or unreadable:
        lines += ["", "## Other files", ""]
        lines += [f"- `{name}.json`: no table for it in run_all.py" for name in others]
        lines += [f"- {entry}: unreadable" for entry in unreadable]
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path, report: Path) -> Path:
    report.write_text(render_report(results_dir))
    print(f"→ {report}")
    return report


def main() -> int:
    names = [step.name for step in suite("", None)]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"), help="MNIST IDX folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, into a temp dir")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=names,
        metavar="NAME",
        help=f"leave a benchmark out (repeatable): {', '.join(names)}",
    )
    ap.add_argument("--report-only", action="store_true", help="only re-render the report from the JSON files")
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="JSON files (default benchmarks/results/; with --quick a new temp dir)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        help="markdown file (default benchmarks/results.md; <results-dir>/results.md for another dir)",
    )
    args = ap.parse_args()
    results_dir = args.results_dir or (
        Path(tempfile.mkdtemp(prefix="lz-bench-quick-")) if args.quick and not args.report_only else RESULTS
    )
    report = args.report or (REPORT if results_dir.resolve() == RESULTS.resolve() else results_dir / "results.md")
    if args.report_only:
        write_report(results_dir, report)
        return 0

    results_dir.mkdir(parents=True, exist_ok=True)
    quick_data = None
    if args.quick and "vae_mnist" not in args.skip:
        # vae_mnist reads all of --data: a small copy (6,000 train images: two shards of 5,000 for two workers)
        quick_data = subset_idx(Path(args.data), results_dir / "mnist-subset", {"train": 6000, "t10k": 1000})
    outcome = {}
    for step in suite(args.data, str(quick_data)):
        if step.name not in args.skip:
            outcome[step.name] = run_step(step, args.quick, results_dir)
    if quick_data:
        shutil.rmtree(quick_data, ignore_errors=True)
    write_report(results_dir, report)
    print("\n" + "\n".join(f"{name:13s} exit {rc}  {wall:6.0f} s" for name, (rc, wall) in outcome.items()))
    failed = [name for name, (rc, _) in outcome.items() if rc]
    if failed:
        print(f"error: {', '.join(failed)} failed (see their output above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
