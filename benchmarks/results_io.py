"""Where every benchmark writes its figures: benchmarks/results/<name>.json (or an explicit file)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, result: dict, out_file: Path | str | None = None) -> Path:
    """Write `result` to `out_file`, by default benchmarks/results/<name>.json."""
    out_file = Path(out_file) if out_file else RESULTS / f"{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"→ {out_file}")
    return out_file


def provenance() -> dict:
    """What produced a result: the command line (relative to the repo), when, and on how many CPUs."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
    }
