"""The package's layers, read from its imports (ast): no package imports one above it, only the CLI
imports the recipes, and the seams stay explicit (no SimpleNamespace, no strategy-name comparisons)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distributed_ft"

# Lowest first; a part may import its own layer (without cycles) and any layer below.
LAYERS = [
    {"strict", "errors", "tasks"},
    {"engine", "strategies", "data", "models"},
    {"rl", "eval", "grader", "cluster", "preference"},
    {"config"},
    {"recipes"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """The parts of distributed_ft a file imports, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                     if node.module == "distributed_ft" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "distributed_ft" and len(parts) > 1:
                found.add(parts[1])
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    assert len(FILES) > 60
    assert {part_of(f) for f in FILES} <= set(LEVEL), {part_of(f) for f in FILES} - set(LEVEL)


def test_no_part_imports_a_higher_layer():
    upward = []
    for path in FILES:
        here = part_of(path)
        for other in imported_parts(path):
            if LEVEL[other] > LEVEL[here]:
                upward.append(f"{path.relative_to(PACKAGE)} ({here}) imports {other}")
    assert not upward, upward


def test_parts_of_one_layer_import_each_other_without_cycles():
    edges = {}
    for path in FILES:
        here = part_of(path)
        edges.setdefault(here, set()).update(p for p in imported_parts(path) if p != here)

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in edges.get(start, ()))

    cycles = [part for part in edges if reaches(part, part)]
    assert not cycles, cycles


def test_only_the_cli_imports_recipes():
    importers = {str(p.relative_to(PACKAGE)) for p in FILES
                 if "recipes" in imported_parts(p) and part_of(p) not in ("recipes", "cli")}
    assert not importers, importers


def test_no_simple_namespace_in_the_package():
    users = [str(p.relative_to(PACKAGE)) for p in FILES if "SimpleNamespace" in p.read_text()]
    assert not users, users


def _string_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for elt in node.elts for s in _string_constants(elt)}
    return set()


def test_no_strategy_name_is_compared_outside_the_strategies():
    """Code outside strategies/ asks a strategy's capabilities (trains, supports_packing, few_shot) instead."""
    from distributed_ft.strategies import registered

    names = set(registered())
    found = []
    for path in FILES:
        if part_of(path) == "strategies":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                compared = set().union(*(_string_constants(n) for n in sides))
                # a strategy's name, or a `method`, against a registered name ("prompt" as a column name is fine)
                about_strategy = any(("strateg" in ast.unparse(n) or ast.unparse(n).endswith((".name", ".method")))
                                     for n in sides if not _string_constants(n))
                if compared & names and about_strategy:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} compares {sorted(compared & names)}")
    assert not found, found


@pytest.mark.parametrize("name", ["IGNORE_INDEX", "EXIT_STOPPED", "TOKEN_ENV"])
def test_shared_constants_are_defined_once(name):
    definitions = [str(p.relative_to(PACKAGE)) for p in FILES
                   for node in ast.walk(ast.parse(p.read_text()))
                   if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)]
    assert len(definitions) == 1, definitions
