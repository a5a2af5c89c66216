"""DVC lineage: every stage depends on the code it runs, so that `dvc repro` re-runs it when that code changes."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, with_overrides

from latentzoo.config import RUNTIME_KEYS
from latentzoo.storage import project_root

SRC = ROOT / "src"
DVC = str(Path(os.sys.executable).with_name("dvc"))


def module_file(module: str) -> Path | None:
    """'latentzoo.data.loader' → src/latentzoo/data/loader.py (or the package's __init__.py); None if absent."""
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The latentzoo modules `path` imports, with the packages on their way (importing a.b.c runs a/__init__,
    a/b/__init__) and names imported from a package that are modules themselves (`from a import b`). Imports under
    `if TYPE_CHECKING:` are for annotations only and never run."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentzoo"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("latentzoo")]
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if module_file(m)}


def import_closure(script: Path) -> set[str]:
    """Every project file `script` runs when it imports, as paths relative to the repo root."""
    seen: set[Path] = set()
    todo = [script, ROOT / "pipelines/stage_env.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(m) for m in imported_modules(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def stages() -> dict[str, tuple[Path, list[str]]]:
    """{stage: (its pipelines/ script, its deps)} from dvc.yaml (a foreach stage once, by its name)."""
    found = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)
        script = re.search(r"python (pipelines/\w+\.py)", stage["cmd"]).group(1)
        found[name] = (ROOT / script, [str(d) for d in stage["deps"]])
    return found


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_depends_on_every_file_it_imports(stage):
    script, deps = stages()[stage]
    missing = sorted(p for p in import_closure(script) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {script.name}, which imports these undeclared deps: {missing}"


def test_the_closure_follows_imports_through_packages():
    closure = import_closure(ROOT / "pipelines/evaluate.py")
    assert "src/latentzoo/evaluation/feature_classifier.py" in closure  # evaluate → evaluation.evaluate → it
    assert "src/latentzoo/evaluation/__init__.py" in closure and "pipelines/stage_env.py" in closure
    assert "src/latentzoo/evaluation/report.py" not in import_closure(ROOT / "pipelines/train.py")


# ---------------------------------------------------------------- what `dvc status` sees in a project


@pytest.fixture(scope="module")
def committed_template(tmp_path_factory) -> Path:
    """A copy of the pipeline whose every stage DVC has recorded as done (stand-in outputs, `dvc commit -f`)."""
    tmp_path = tmp_path_factory.mktemp("committed")
    for name in ("src", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc/config", tmp_path / ".dvc/config")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    models = yaml.safe_load((tmp_path / "params.yaml").read_text())["models"]
    for stage in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"].values():
        for item in models if "foreach" in stage else [None]:
            body = stage.get("do", stage)
            for entry in (e for kind in ("outs", "metrics", "plots") for e in body.get(kind, [])):
                path = tmp_path / str(next(iter(entry)) if isinstance(entry, dict) else entry).replace(
                    "${item}", str(item)
                )
                target = path if path.suffix else path / "stub"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("{}\n")
    dvc(tmp_path, "commit", "-f", "-q")
    assert changed_stages(tmp_path) == set()
    return tmp_path


@pytest.fixture
def committed_project(committed_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of `committed_template` for one test to edit."""
    project = shutil.copytree(committed_template, tmp_path / "project", symlinks=True)
    assert changed_stages(project) == set()
    return project


def dvc(project: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(dvc(project, "status", "--json") or "{}"))


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


def test_editing_the_feature_classifier_changes_the_stages_that_run_it(committed_project):
    edit(committed_project / "src/latentzoo/evaluation/feature_classifier.py")
    models = yaml.safe_load((committed_project / "params.yaml").read_text())["models"]
    assert changed_stages(committed_project) == {"classifier", *(f"evaluate@{m}" for m in models)}


@pytest.mark.parametrize("code", ["evaluation/report.py", "evaluation/templates/report.md.j2"])
def test_editing_the_report_code_changes_the_report_only(committed_project, code):
    edit(committed_project / "src/latentzoo" / code)
    assert changed_stages(committed_project) == {"report"}


def test_python_bytecode_is_not_an_input(committed_project):
    cache = committed_project / "src/latentzoo/models/__pycache__"
    cache.mkdir()
    (cache / "vae.cpython-311.pyc").write_bytes(b"\0")  # what importing the package on another machine leaves
    assert changed_stages(committed_project) == set()


# ---------------------------------------------------------------- params: what re-runs a stage


def expanded_stages(project: Path = ROOT) -> dict[str, dict]:
    """{stage: {"argv": its command after `python`, "params": its params keys}}, foreach stages expanded over
    params.yaml's models (named as `dvc stage list` names them)."""
    models = yaml.safe_load((project / "params.yaml").read_text())["models"]
    found = {}
    for name, stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        for item in models if "foreach" in stage else [None]:
            found[f"{name}@{item}" if item else name] = {
                "argv": shlex.split(body["cmd"].replace("${item}", str(item)))[1:],
                "params": [str(k).replace("${item}", str(item)) for k in body.get("params", [])],
            }
    return found


def stage_params(project: Path = ROOT) -> dict[str, list[str]]:
    """{stage: its params keys} (see `expanded_stages`)."""
    return {name: stage["params"] for name, stage in expanded_stages(project).items()}


def within(key: str, keys: list[str] | tuple[str, ...]) -> bool:
    """Is dotted `key` one of `keys` or inside one of them ('vae.beta' is within 'vae')?"""
    return any(key == k or key.startswith(k + ".") for k in keys)


def compare_reads(project: Path, records: Path) -> dict[str, dict[str, list[str]]]:
    """{stage: {"undeclared": keys it read that dvc.yaml does not list, "unread": listed keys it never read}} from
    the records `latentzoo.params_reads` wrote for each stage process of a `dvc repro` of `project`."""
    stages = expanded_stages(project)
    declared = {name: stage["params"] for name, stage in stages.items()}
    by_command = {tuple(stage["argv"]): name for name, stage in stages.items()}
    reads: dict[str, set[str]] = {}
    for record in map(json.loads, (p.read_text() for p in records.glob("*.json"))):
        stage = by_command.get(tuple(record["argv"]))  # Ray's worker processes are no stage
        if stage:
            reads.setdefault(stage, set()).update(record["reads"])
    assert set(reads) == set(declared), f"stages recorded {sorted(reads)} vs dvc.yaml's {sorted(declared)}"
    found = {}
    for stage, keys in reads.items():
        undeclared = sorted(k for k in keys if not within(k, declared[stage]) and not within(k, RUNTIME_KEYS))
        unread = sorted(d for d in declared[stage] if not any(within(k, [d]) or within(d, [k]) for k in keys))
        if undeclared or unread:
            found[stage] = {"undeclared": undeclared, "unread": unread}
    return found


def test_reads_are_compared_with_the_declared_keys(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("models: [vae]\n")
    command = "python pipelines/train.py --model ${item}"
    stages = {"train": {"foreach": "${models}", "do": {"cmd": command, "params": ["seed", "${item}", "train.lr"]}}}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    records = tmp_path / "records"
    records.mkdir()
    argv = ["pipelines/train.py", "--model", "vae"]
    reads = ["seed", "vae.beta", "train.cache_mb", "ray.num_cpus"]
    (records / "1.json").write_text(json.dumps({"argv": argv, "reads": reads}))
    (records / "2.json").write_text(json.dumps({"argv": ["ray/default_worker.py"], "reads": ["data.source"]}))
    assert compare_reads(project, records) == {"train@vae": {"undeclared": ["train.cache_mb"], "unread": ["train.lr"]}}


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else {dotted}
    return keys


def test_runtime_knobs_re_run_nothing_and_every_other_knob_feeds_a_stage():
    declared = [key for keys in stage_params().values() for key in keys]
    runtime = [key for key in declared if covered(key.replace(".", "/"), [k.replace(".", "/") for k in RUNTIME_KEYS])]
    assert not runtime, f"dvc.yaml lists knobs that config.RUNTIME_KEYS says change no result: {runtime}"
    as_paths = [k.replace(".", "/") for k in (*declared, *RUNTIME_KEYS)]
    orphans = sorted(
        key
        for key in leaf_keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
        if not covered(key.replace(".", "/"), as_paths)
    )
    assert not orphans, f"params.yaml knobs no stage depends on (list them in dvc.yaml or RUNTIME_KEYS): {orphans}"


def set_params(project: Path, **changes) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(path.read_text()), changes), sort_keys=False))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"tune.space.vae.beta.high": 8.0}, {"tune@vae"}),  # train@vae follows only if the best weights change
        ({"ray.log_level": "INFO", "tracking.enabled": False, "train.max_failures": 5}, set()),
        ({"train.epochs": 3}, {"train@vae", "train@vqvae", "train@simvq", "train@resvae_gan"}),  # not tune: trials
        ({"vae.beta": 2.0}, {"tune@vae", "train@vae"}),
        ({"finetune.label_fraction": 0.5}, {"finetune"}),
    ],
    ids=["search-range", "runtime-knobs", "train-epochs", "model-section", "finetune"],
)
def test_a_params_change_changes_exactly_the_stages_it_can_affect(committed_project, changes, expected):
    set_params(committed_project, **changes)
    assert changed_stages(committed_project) == expected


def test_the_shuffle_switch_reaches_every_training_stage(committed_project):
    set_params(committed_project, **{"train.cache_mb": 0})  # exact in-memory shuffle → a shuffle buffer
    changed = changed_stages(committed_project)
    assert {"pretrain", "finetune", "tune@vae", "train@vae"} <= changed and "evaluate@vae" not in changed


def test_a_queued_experiment_works_for_the_project_around_its_temporary_copy(tmp_path):
    copy = tmp_path / "project/.dvc/tmp/exps/tmp1a2b/pipelines"
    copy.mkdir(parents=True)
    assert project_root(copy.parent) == project_root(copy) == tmp_path / "project"  # its mlflow.db, .ray_results
    assert project_root(tmp_path) == tmp_path
