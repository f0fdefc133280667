"""The house rules of ARCHITECTURE.md, checked on the source: imports flow one way between the
rooms, and no function grows past ~50 lines without saying why."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# room -> the rooms it may import (ARCHITECTURE.md, "The rooms"). "base" is errors, schema, config,
# progress, logs, page and the package itself.
ALLOWED = {
    "base": set(),
    "data": {"base"},
    "train": {"base", "data"},
    "evaluate": {"base", "data"},
    "cluster": {"base"},
    "runs": {"base", "data", "evaluate", "cluster"},
    "serve": {"base", "data", "evaluate"},
    "checks": {"base", "data", "train", "evaluate", "cluster", "runs", "serve"},
    "jobs": {"base", "data", "train", "evaluate", "cluster", "runs", "serve", "checks"},
    "cli": {"base", "data", "train", "evaluate", "cluster", "runs", "serve", "checks", "jobs"},
}
BASE_MODULES = {"errors", "schema", "config", "progress", "logs", "page", "__init__"}
MAX_FUNCTION_LINES = 50


def _sources() -> list[Path]:
    return sorted([*(REPO / "lib").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])


def _room_of_file(path: Path) -> str:
    if path.is_relative_to(REPO / "jobs"):
        return "jobs"
    rel = path.relative_to(REPO / "lib")
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "cli" if rel.stem == "__main__" else "base" if rel.stem in BASE_MODULES else rel.stem


def _room_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "slurmtune":
        return None
    if len(parts) == 1 or parts[1] in BASE_MODULES or parts[1].isupper() or parts[1].startswith("__"):
        return "base"  # `from slurmtune import SOURCE_ROOT, __version__`
    return parts[1]


def _imports(tree: ast.AST):
    for node in ast.walk(tree):  # function-local (lazy) imports count as much as top-level ones
        if isinstance(node, ast.ImportFrom) and node.module == "slurmtune":
            yield node.lineno, [f"slurmtune.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, [node.module]
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]


def test_every_source_file_is_in_a_known_room():
    rooms = {_room_of_file(p) for p in _sources()}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


def test_imports_flow_one_way_between_rooms():
    wrong = []
    for path in _sources():
        room = _room_of_file(path)
        for line, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for name in names:
                target = _room_of_module(name)
                if target and target != room and target not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(REPO)}:{line}: {room} imports {name} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_layering_rule_catches_an_import_against_it(tmp_path):
    """The check above is not vacuous: a data module importing the cluster room is caught."""
    tree = ast.parse("def f():\n    from slurmtune.cluster.slurm import submit\n")
    targets = [_room_of_module(n) for _, names in _imports(tree) for n in names]
    assert targets == ["cluster"] and "cluster" not in ALLOWED["data"]


def test_no_function_is_long_without_saying_why():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                long.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} has {lines} lines")
    assert not long, "\n".join(long) + "\n(split it, or say 'Long because ...' in its docstring)"
