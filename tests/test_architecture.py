"""The package's floors (ARCHITECTURE.md): a module imports only from its own floor or the floors below, so each
layer can be read, tested and replaced without the ones above it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rulesearch"

FLOORS = {
    "errors": 1, "batched": 1, "_lazy": 1, "native": 1, "lang": 1, "io": 1,
    "compile": 2, "networks": 2, "credit": 2, "tasks": 2, "neural": 2,
    "inner": 3, "fixedpoint": 3, "reservoir": 3,
    "train": 4, "distill": 4,
    "cli": 5, "evaluate": 5, "reference": 5, "__init__": 5,
}  # fmt: skip

DEFERRED = {("lang", "compile"): "Rule.torch() and Rule.compile(): the exports of a rule object, imported when called"}
"""Upward imports allowed inside functions only (never at import time), each with its reason."""


def _unit(path: Path) -> str:
    """The top-level module or subpackage of ``rulesearch`` a file belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path):
    """``(line, unit, deferred)`` of every import of a rulesearch unit (``deferred``: inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ('rulesearch', 'inner')
    deferred = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        late = id(node) in deferred
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
            else:
                parts = node.module.split(".") if node.module else []
            if parts[:1] == ["rulesearch"] and len(parts) > 1:
                yield node.lineno, parts[1], late
            elif parts == ["rulesearch"]:
                yield from ((node.lineno, alias.name, late) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rulesearch" and len(parts) > 1:
                    yield node.lineno, parts[1], late


def test_every_unit_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOORS), sorted(units - set(FLOORS))


def test_modules_import_only_their_floor_or_below():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for line, other, late in _imported_units(path):
            if late and (unit, other) in DEFERRED:
                continue
            if other in FLOORS and FLOORS[other] > FLOORS[unit]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} ({unit}, floor {FLOORS[unit]}) imports {other} "
                           f"(floor {FLOORS[other]})")  # fmt: skip
    assert not bad, "\n".join(bad)
