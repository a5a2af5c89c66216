"""docs/reliability.md stays true: every test its fault table names exists, so a row loses no test silently, and a
row that names a stage ("the train stage", `pipelines/tune.py`, `evaluate@vae`, "every stage") names only tests
that really run that stage: its script, its stage function or its library entry point, not a stand-in."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"
COLUMNS = ["fault", "what the user sees", "what is left on disk", "test"]
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)+)(?:\[[^`]*\])?`")
STAGES = ("prepare", "shard", "classifier", "tune", "train", "evaluate", "pretrain", "finetune", "report")
NAMED_STAGE = re.compile(rf"\b({'|'.join(STAGES)})(?: stage\b|@|\.py\b)")
EVERY_STAGE = re.compile(r"\b(?:every|any|each) stage\b")
ENTRY = {  # the library function a stage script calls, which a test may call (or pass on) instead of the script
    "prepare": "prepare",
    "shard": "write_shards",
    "classifier": "train_classifier",
    "tune": "tune_model",
    "train": "train_model",
    "evaluate": "evaluate_model",
    "pretrain": "pretrain_stack",
    "finetune": "finetune_stack",
    "report": "build_report",
}


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of the table whose header is COLUMNS; section rows (a bold fault, no test) left out."""
    rows, inside = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        # split on pipes outside backticks: a message may quote one
        cells = [c.strip() for c in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip().strip("|"))]
        if cells == COLUMNS:
            inside = True
        elif inside and not set(line) <= set("|-: ") and not (cells[0].startswith("**") and not any(cells[1:])):
            rows.append(cells)
    return rows


@cache
def defined_names(path: Path) -> set[tuple[str, ...]]:
    """("test_x",) for every function at the top of `path`, ("TestX", "test_y") for methods of its classes."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add((node.name,))
        elif isinstance(node, ast.ClassDef):
            names |= {(node.name, f.name) for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


@cache
def top_level(path: Path) -> dict[str, tuple[str, set[str]]]:
    """{name: (its source, the names it uses)} of the functions, classes and assignments at the top of `path`, and
    for `from test_x import y`, y: ("", {"test_x.y"})."""
    text = path.read_text()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.module and (path.parent / f"{node.module}.py").is_file():
            found |= {a.asname or a.name: ("", {f"{node.module}.{a.name}"}) for a in node.names}
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        found |= {name: (ast.get_source_segment(text, node), used) for name in names}
    return found


def closure_source(path: Path, name: str) -> str:
    """The source of test `name` in `path` and of every top-level helper and constant it reaches, in its module or
    in the test modules it imports from."""
    seen, todo, parts = set(), [(path, name)], []
    while todo:
        file, item = todo.pop()
        if (file, item) in seen or item not in top_level(file):
            continue
        seen.add((file, item))
        source, used = top_level(file)[item]
        parts.append(source)
        for ref in used:
            module, _, imported = ref.rpartition(".")
            todo.append((file.parent / f"{module}.py", imported) if module else (file, ref))
    return "\n".join(parts)


def exercises(source: str, stage: str) -> bool:
    """Does test source run `stage`: its script, its stage function, its library entry, or `dvc repro` of it?"""
    direct = (f"pipelines/{stage}.py", f'"{stage}.py"', f"{stage}_stage(")
    called = re.search(rf"\b(?:{stage}_stage|{ENTRY[stage]})[(,)]", source)
    under_dvc = '"repro"' in source and (f'"{stage}"' in source or f'"{stage}@' in source)
    return any(marker in source for marker in direct) or bool(called) or under_dvc


def row_stages(fault: str) -> set[str]:
    return set(STAGES) if EVERY_STAGE.search(fault) else set(NAMED_STAGE.findall(fault))


def test_every_row_names_a_test():
    rows = table_rows(DOC.read_text())
    assert len(rows) >= 40, "the fault table was not found (its header must be: | " + " | ".join(COLUMNS) + " |)"
    bare = [fault for fault, *_, tests in rows if not NODE_ID.findall(tests)]
    assert not bare, f"rows that name no test (`tests/test_x.py::test_name`): {bare}"


def test_every_test_named_exists():
    missing = []
    for file, names in sorted(set(NODE_ID.findall(DOC.read_text()))):
        path = ROOT / file
        if not path.is_file() or tuple(names.split("::")[1:]) not in defined_names(path):
            missing.append(file + names)
    assert not missing, "docs/reliability.md names tests that do not exist:\n" + "\n".join(missing)


def test_a_row_about_a_stage_names_tests_that_run_it():
    stand_ins = []
    for fault, *_, tests in table_rows(DOC.read_text()):
        for stage in sorted(row_stages(fault)):
            for file, names in NODE_ID.findall(tests):
                source = closure_source(ROOT / file, names.split("::")[-1])
                if not exercises(source, stage):
                    stand_ins.append(f"{fault[:60]!r}: {file}{names} does not run the {stage} stage")
    assert not stand_ins, "rows whose test is a stand-in for the stage they name:\n" + "\n".join(stand_ins)


def test_the_stage_check():
    assert row_stages("SIGTERM to the train stage after two epochs") == {"train"}
    assert row_stages("Ctrl-C to `pipelines/tune.py`, or to `evaluate@vae`") == {"tune", "evaluate"}
    assert row_stages("SIGINT to any stage run by `dvc repro`") == set(STAGES)
    assert row_stages("a truncated PNG in an image folder") == set()
    interrupts = closure_source(
        ROOT / "tests/test_interrupt_stages.py", "test_train_and_evaluate_stopped_midway_finish_on_the_next_run"
    )
    assert exercises(interrupts, "train") and exercises(interrupts, "evaluate") and not exercises(interrupts, "tune")
    stand_in = closure_source(ROOT / "tests/test_bad_input.py", "test_sigint_mid_write_exits_130_and_leaves_nothing")
    assert not any(exercises(stand_in, stage) for stage in STAGES)  # a script of its own, no stage


def test_the_table_parser():
    doc = "| " + " | ".join(COLUMNS) + " |\n|---|---|---|---|\n| **Data** | | | |\n"
    doc += "| fault | `a | b` | nothing | `tests/test_prepare.py::test_idx_truncated[True]`, `tests/test_no.py::t` |\n"
    (row,) = table_rows(doc)  # the section row is left out, the pipe inside backticks splits no cell
    assert row[1] == "`a | b`"
    assert NODE_ID.findall(row[3]) == [("tests/test_prepare.py", "::test_idx_truncated"), ("tests/test_no.py", "::t")]
    assert ("test_idx_truncated",) in defined_names(ROOT / "tests/test_prepare.py")
    assert ("test_not_there",) not in defined_names(ROOT / "tests/test_prepare.py")
