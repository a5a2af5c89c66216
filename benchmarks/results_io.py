"""Where every benchmark writes its figures (benchmarks/results/<name>.json), what each JSON records about how it
was made, and the statistics the report uses to call a difference.

`provenance()` records the command, date, git commit, machine (cores, GPU) and versions, and the sha256 of every
project file the benchmark had imported when it wrote its result; `stale_sources` compares those with the files
as they are now, so results.md flags a figure whose producing code changed since it was measured. The commit and
the hashes are those of when the benchmark imported this module (its start): a run that hours later writes its
result after a commit records the code it ran, not the code at its end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
TRACKED = ("src/latentzoo", "benchmarks")  # the project files whose hashes a result records


def write_result(name: str, result: dict, out_file: Path | str | None = None) -> Path:
    """Write `result` with its provenance to `out_file`, by default benchmarks/results/<name>.json."""
    out_file = Path(out_file) if out_file else RESULTS / f"{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({**provenance(), **result}, indent=2) + "\n")
    print(f"→ {out_file}")
    return out_file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tracked_files() -> dict[str, str]:
    """{repo path: sha256} of every project file a result may record, as they are now."""
    return {p.relative_to(ROOT).as_posix(): _sha256(p) for part in TRACKED for p in sorted((ROOT / part).rglob("*.py"))}


def _commit() -> str:
    """HEAD, with '+dirty' when tracked project files have changes."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no", "--", *TRACKED):
        commit += "+dirty"
    return commit


def source_hashes() -> dict[str, str]:
    """{repo path: sha256} of the project files loaded in this process (the benchmark script and what it imports),
    as they were when the run started (`AT_START`)."""
    found = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.suffix == ".py" and path.is_relative_to(ROOT) and path.is_file():  # not a relative __file__
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(TRACKED):
                found[relative] = AT_START["files"].get(relative) or _sha256(path)
    return dict(sorted(found.items()))


def stale_sources(result: dict, root: Path = ROOT) -> list[str] | None:
    """The recorded source files that changed (or vanished) since the result was measured; None if it records none."""
    recorded = result.get("sources")
    if not recorded:
        return None
    return sorted(p for p, sha in recorded.items() if not (root / p).exists() or _sha256(root / p) != sha)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "ray", "vector_quantize_pytorch"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def _gpu() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def provenance() -> dict:
    """What produced a result: the command line (relative to the repo), when, at which commit (with '+dirty' when
    tracked files had changes), on what machine, with which versions, from which source files."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "started": AT_START["date"],
        "commit": AT_START["commit"],
        "machine": {"cpus": os.cpu_count(), "gpu": _gpu(), "platform": platform.platform(terse=True)},
        "versions": _versions(),
        "sources": source_hashes(),
    }


# ---------------------------------------------------------------- several seeds


def summary(values: list[float]) -> dict:
    """{"mean", "std" (sample standard deviation; 0 for one value), "n", "values"} of one figure over seeds."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def differs(a: dict, b: dict) -> bool:
    """Do two summaries' mean ± std intervals not overlap? (The report calls a difference only then.)"""
    return a["mean"] + a["std"] < b["mean"] - b["std"] or b["mean"] + b["std"] < a["mean"] - a["std"]


def mean_std(s: dict | None, spec: str = ".2f") -> str:
    """'12.34 ± 0.56 (n=3)' for a summary; '–' for none."""
    if not s:
        return "–"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}} (n={s['n']})"


# When a benchmark imports this module, at its start: the commit and the project files it is about to run.
AT_START = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": _commit(), "files": _tracked_files()}
