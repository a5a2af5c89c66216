"""Where every benchmark writes its figures (benchmarks/results/<name>.json), what each JSON records about how it
was made, and the statistics the report uses to call a difference.

`provenance()` records the command, date, git commit, machine (cores, GPU) and versions, and the sha256 of every
project file the benchmark had imported when it wrote its result and of each params.yaml section it read
(`read_params`); `stale_sources` compares those with the files as they are now, so results.md flags a figure
whose producing code or defaults changed since it was measured. The commit and the hashes are those of when the
benchmark imported this module (its start): a run that hours later writes its result after a commit records the
code it ran, not the code at its end.
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
CONFIG = "params.yaml"  # recorded too, per section, where a benchmark reads it (`read_params`)
PIPELINE_SECTIONS = ("seed", "data", "shard", "train", "evaluate")  # what every pipeline-driving benchmark reads


def write_result(name: str, result: dict, out_file: Path | str | None = None) -> Path:
    """Write `result` with its provenance to `out_file`, by default benchmarks/results/<name>.json."""
    out_file = Path(out_file) if out_file else RESULTS / f"{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({**provenance(), **result}, indent=2) + "\n")
    print(f"→ {out_file}")
    return out_file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_params(*sections: str) -> dict:
    """params.yaml as a dict (as it was at the start). The result records the hash of each named section, or of
    the whole file without names: a later change to the defaults the figures came from flags them stale, a change
    to another family's section does not."""
    unknown = [section for section in sections if section not in AT_START["config"]]
    if unknown:
        raise KeyError(f"{CONFIG} has no section {', '.join(unknown)}")
    _PARAMS_READ.update(sections or [""])
    return json.loads(AT_START["params"])


def _config_hashes(root: Path) -> dict[str, str]:
    """sha256 of params.yaml under `root` ("") and of each of its sections (canonical JSON), one read and parse;
    {} without the file."""
    import yaml

    path = root / CONFIG
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    sections = {
        name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest() for name, value in raw.items()
    }
    return {"": _sha256(path), **sections}


def _config_key(section: str) -> str:
    return f"{CONFIG}:{section}" if section else CONFIG


def _tracked_files() -> dict[str, str]:
    """{repo path: sha256} of every project file a result may record, as they are now."""
    return {p.relative_to(ROOT).as_posix(): _sha256(p) for part in TRACKED for p in sorted((ROOT / part).rglob("*.py"))}


def _commit() -> str:
    """HEAD, with '+dirty' when tracked project files have changes."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no", "--", *TRACKED, CONFIG):
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
    for section in _PARAMS_READ:
        found[_config_key(section)] = AT_START["config"][section]
    return dict(sorted(found.items()))


def stale_sources(result: dict, root: Path = ROOT) -> list[str] | None:
    """The recorded source files that changed (or vanished) since the result was measured; None if it records none."""
    recorded = result.get("sources")
    if not recorded:
        return None
    config = _config_hashes(root) if any(_is_config(key) for key in recorded) else {}

    def now(key: str) -> str | None:  # a file's hash, or params.yaml's section's ("params.yaml:vae"); None if gone
        if _is_config(key):
            return config.get(key.partition(":")[2])
        return _sha256(root / key) if (root / key).is_file() else None

    return sorted(key for key, sha in recorded.items() if now(key) != sha)


def _is_config(key: str) -> bool:
    return key == CONFIG or key.startswith(CONFIG + ":")


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


def _config_at_start() -> tuple[str, dict[str, str]]:
    """params.yaml's contents (JSON) and the hashes of the file and of each of its sections, as they are now."""
    import yaml

    path = ROOT / CONFIG
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return json.dumps(raw), _config_hashes(ROOT)


# When a benchmark imports this module, at its start: the commit and the project files it is about to run.
_PARAMS_READ: set[str] = set()
AT_START = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": _commit(), "files": _tracked_files()}
AT_START["params"], AT_START["config"] = _config_at_start()
