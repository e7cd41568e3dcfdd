"""The floor plan (docs/design.md), enforced by reading every module's imports with `ast`.

Floors, ground first: pipeline (1) < features (2) < models (3) < flows (4) < mrhp (5).
- No module imports from a higher floor: module level, inside functions and classes, and
  `importlib.import_module("...")` with a literal name all count; only imports under
  `if TYPE_CHECKING:` are exempt (they never run).
- features/ never imports Prefect; flows/ never imports torch (anywhere in the module).
- No exemptions: the old `pipeline/cli.py`, `pipeline/demo.py` and `features/params.py` re-export
  shims are gone (a shim on a low floor re-exporting a high one is a back-up arrow too).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"pipeline": 1, "features": 2, "models": 3, "flows": 4, "mrhp": 5}



def _modules() -> list[Path]:
    return sorted(p for pkg in FLOORS for p in (ROOT / pkg).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, skipping `if TYPE_CHECKING:` bodies."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: relative import (use absolute imports)"
            yield node.lineno, node.module or ""
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def _floor(path: Path) -> int:
    return FLOORS[path.relative_to(ROOT).parts[0]]


def test_the_walker_sees_function_level_imports_and_skips_type_checking():
    src = (
        "import os\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from models.trainer import Trainer\n"
        "def f():\n    from flows.extract import extract_flow\n    import torch.nn\n"
        "    importlib.import_module('mrhp.cli')\n"
    )
    got = [m for _, m in imported_modules(ast.parse(src))]
    assert sorted(got) == ["flows.extract", "mrhp.cli", "os", "torch.nn", "typing"]


def test_every_floor_has_modules():
    seen = {p.relative_to(ROOT).parts[0] for p in _modules()}
    assert seen == set(FLOORS)


def test_no_module_imports_from_a_higher_floor():
    arrows = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for line, mod in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            top = mod.split(".")[0]
            if top in FLOORS and FLOORS[top] > _floor(path):
                arrows.append(f"{rel}:{line} imports {mod}")
    assert arrows == [], "imports from a higher floor:\n" + "\n".join(arrows)


def test_features_never_import_prefect():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in (ROOT / "features").rglob("*.py")
           for line, mod in imported_modules(ast.parse(p.read_text(encoding="utf-8")))
           if mod.split(".")[0] in ("prefect", "prefect_dask")]
    assert bad == []


def test_flows_never_import_torch():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in (ROOT / "flows").rglob("*.py")
           for line, mod in imported_modules(ast.parse(p.read_text(encoding="utf-8")))
           if mod.split(".")[0] in ("torch", "torchvision")]
    assert bad == []
