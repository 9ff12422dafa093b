"""Imports go downward only: cli -> sync -> ops/plan -> tree -> store -> model/errors."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "volsync"
LAYER = {
    "model": 0, "errors": 0, "quoting": 0, "child": 0, "store": 1, "wire": 1, "tree": 2, "ops": 3, "plan": 3, "retention": 3.5,
    "endpoint": 4, "remote": 5, "sync": 6, "stream": 6, "render": 6, "cli_help": 6, "cli": 7, "__main__": 8,
    "__init__": 0,
}


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent.relative_to(PKG).parts[: len(path.parent.relative_to(PKG).parts)
                                                       - (node.level - 1)]
            parts = list(base) + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:  # `from . import x, y`: only the names that are modules count
                found.update(a.name for a in node.names
                             if (PKG / f"{a.name}.py").exists() or (PKG / a.name).is_dir())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("volsync"):
            rest = node.module.split(".")[1:]
            found.update(rest[:1] or [a.name for a in node.names])
    return found


def test_imports_go_downward_only():
    # each module imports only modules of a lower layer (or its own package, for store/)
    problems = []
    for path in PKG.rglob("*.py"):
        mine = module_of(path)
        for other in imported_modules(path):
            if other == mine:
                continue
            if LAYER[other] >= LAYER[mine] and other not in ("__init__",):
                problems.append(f"{path.relative_to(PKG)} imports {other}")
    assert not problems, problems


def test_plan_does_no_io():
    # the planner is pure: no os, no open, no pathlib
    source = (PKG / "plan.py").read_text()
    tree = ast.parse(source)
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not names & {"os", "pathlib", "shutil"}
    assert "open(" not in source
