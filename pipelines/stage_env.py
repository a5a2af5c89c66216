"""Run the stage with the project's `.venv` interpreter when the `python` DVC found on PATH cannot import latentzoo.

DVC runs each stage's `cmd` with the first `python` on PATH. That is `.venv/bin/python` inside `make` or an
activated venv, but not for `.venv/bin/dvc repro` typed in a plain shell, where it is the system's. Every stage
script imports this module before latentzoo: if latentzoo is importable (the venv, a cluster image, any environment that
installed it) nothing happens; otherwise the script starts again under `.venv/bin/python`, or stops with one
line saying how to install it.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# The project's venv: here, or, for a queued experiment DVC runs in a temporary copy of the project
# (<project>/.dvc/tmp/exps/<tmp>/), the project's (latentzoo.storage.project_root).
OUTER = [Path(*HERE.parts[:i]) for i in range(len(HERE.parts)) if HERE.parts[i : i + 3] == (".dvc", "tmp", "exps")]
VENV = next((d / ".venv" for d in (HERE, *OUTER) if (d / ".venv/bin/python").exists()), HERE / ".venv")

try:
    import latentzoo  # noqa: F401
except ModuleNotFoundError:
    python = VENV / "bin" / "python"
    if not python.exists() or Path(sys.prefix).resolve() == VENV.resolve():  # no venv, or in it already
        sys.exit(
            f"error: {sys.executable} cannot import latentzoo and {python} is missing or lacks it too: "
            "run `make install` (or install the project into this interpreter: pip install -e .)"
        )
    os.execv(python, [str(python), *sys.argv])
