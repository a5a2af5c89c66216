"""docs/reliability.md stays true: every test its fault table names exists, so a row loses no test silently."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"
COLUMNS = ["fault", "what the user sees", "what is left on disk", "test"]
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)+)(?:\[[^`]*\])?`")


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


def test_the_table_parser():
    doc = "| " + " | ".join(COLUMNS) + " |\n|---|---|---|---|\n| **Data** | | | |\n"
    doc += "| fault | `a | b` | nothing | `tests/test_prepare.py::test_idx_truncated[True]`, `tests/test_no.py::t` |\n"
    (row,) = table_rows(doc)  # the section row is left out, the pipe inside backticks splits no cell
    assert row[1] == "`a | b`"
    assert NODE_ID.findall(row[3]) == [("tests/test_prepare.py", "::test_idx_truncated"), ("tests/test_no.py", "::t")]
    assert ("test_idx_truncated",) in defined_names(ROOT / "tests/test_prepare.py")
    assert ("test_not_there",) not in defined_names(ROOT / "tests/test_prepare.py")
