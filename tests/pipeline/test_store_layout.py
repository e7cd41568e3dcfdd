"""The floor plan of the store package (pipeline/store/__init__.py draws it): each module imports
only from the modules below it, and every SQL statement lives in index.py."""
from __future__ import annotations

import ast
import re
from pathlib import Path

STORE = Path(__file__).resolve().parents[2] / "pipeline" / "store"
# Ground floor first; a module may import only from modules on a lower floor.
FLOORS = {"errors": 0, "fs": 0, "index": 1, "segment": 2, "writer": 3, "reader": 3, "maintenance": 4, "__init__": 5}
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|BEGIN|COMMIT|ROLLBACK|PRAGMA)\b")


def store_imports(tree: ast.AST) -> set[str]:
    """The pipeline.store modules imported (`from pipeline.store.x import ...`, `from pipeline.store import x`)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline.store":
            out.update(a.name for a in node.names if a.name in FLOORS)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.store."):
            out.add(node.module.split(".")[2])
    return out


def sql_strings(tree: ast.AST) -> list[str]:
    """String constants (f-string parts included) that start like an SQL statement."""
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and SQL.match(n.value)]


def test_the_checks_see_what_they_look_for():
    tree = ast.parse('from pipeline.store.index import Index\nq = f"SELECT key FROM items WHERE k IN {x}"\n'
                     'doc = "select the rows"\n')
    assert store_imports(tree) == {"index"}
    assert sql_strings(tree) == ["SELECT key FROM items WHERE k IN "]


def test_each_store_module_imports_only_from_lower_floors():
    assert {p.stem for p in STORE.glob("*.py")} == set(FLOORS), "a module was added: give it a floor here"
    for path in sorted(STORE.glob("*.py")):
        for dep in store_imports(ast.parse(path.read_text(encoding="utf-8"))):
            assert FLOORS[dep] < FLOORS[path.stem], f"{path.name} imports pipeline.store.{dep} (not below it)"


def test_sql_statements_live_only_in_index_py():
    for path in sorted(STORE.glob("*.py")):
        found = sql_strings(ast.parse(path.read_text(encoding="utf-8")))
        if path.name == "index.py":
            assert found  # the check does see them
        else:
            assert not found, f"{path.name} holds SQL: {found[:3]}"
