"""The dependency direction of the packages: each layer imports only from the layers below it (or its own), and
project modules are imported at the top of a module, never inside a function (heavy third-party packages such as
ray, mlflow and optuna may be imported where they are used); and no module imports more than a dozen project
modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

SRC = ROOT / "src/latentzoo"
LAYERS = [  # bottom first
    {"errors", "atomic", "schema", "params_reads", "faults", "ddp"},
    {"models"},
    {"config", "checkpoint", "storage"},
    {"data"},
    {"evaluation"},
    {"tracking"},
    {"training"},
    {"tuning"},
    {"stages", "cli", "submit", "local_cluster"},
]


def layer(module: str) -> int:
    """'latentzoo.training.loop' → the index of its layer ('training')."""
    top = module.split(".")[1] if "." in module else "stages"  # the package root sits with the entry points
    return next(i for i, names in enumerate(LAYERS) if top in names)


def project_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported latentzoo module, imported inside a function?) for every import in the module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("latentzoo"):
                found.append((child.module, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("latentzoo"))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = sorted(SRC.rglob("*.py"))
MAX_PROJECT_IMPORTS = 12  # a module that needs more of the project than this does more than one thing


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_and_sit_at_the_top(path: Path):
    module = "latentzoo." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    problems = []
    for imported, in_function in project_imports(ast.parse(path.read_text())):
        if in_function:
            problems.append(f"imports {imported} inside a function")
        if imported != "latentzoo" and layer(imported) > layer(module):
            problems.append(f"imports {imported} from a layer above its own")
    assert not problems, f"{module}: " + "; ".join(problems)


def test_every_package_has_a_layer():
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_the_check_sees_an_upward_import():
    tree = ast.parse("from latentzoo.training.loop import run_loop\ndef f():\n    import latentzoo.config\n")
    assert project_imports(tree) == [("latentzoo.training.loop", False), ("latentzoo.config", True)]
    assert layer("latentzoo.training.loop") > layer("latentzoo.evaluation.evaluate")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_more_than_a_dozen_project_modules(path: Path):
    imported = {name for name, _ in project_imports(ast.parse(path.read_text()))}
    assert len(imported) <= MAX_PROJECT_IMPORTS, f"{path.relative_to(SRC)} imports {len(imported)}: {sorted(imported)}"
