"""The package's import graph, read from the source with ``ast``: imports only point down the tiers (ops -> modules ->
layers -> models -> jobs -> commands), no module imports another's private name, and no import cycles, counting
imports inside functions too (a cycle that a function-local import hides is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import efla

SRC = Path(efla.__file__).parent
TIERS = ("ops", "modules", "layers", "models", "jobs", "commands")
"""Lowest first: a module may import its own tier and those to its left."""
_PACKAGE_TIER = {"ops": "ops", "modules": "modules", "layers": "layers", "models": "models", "train": "jobs",
                 "eval": "jobs", "experiments": "jobs", "data": "jobs", "dynamics": "jobs", "commands": "commands",
                 "cli": "commands", "__main__": "commands"}
BASE = {"efla.device", "efla.variants", "efla.errors", "efla.vocab"}
"""Utilities of every tier: they import no other efla module."""
FACADE = {"efla", "efla.hf_registration"}
"""The package root (the public names, the model classes on first use) and the hook that registers model_type "efla"
with transformers' Auto classes: they import downwards on demand, and nothing below the jobs imports them."""


def _module_name(path: Path) -> str:
    parts = ("efla", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _tier(module: str) -> str | None:
    """The tier of an efla module; None for the base utilities and the facade."""
    if module in BASE or module in FACADE:
        return None
    return _PACKAGE_TIER[module.split(".")[1]]


def _resolve(target: str) -> str:
    """The efla module an import names: the longest prefix of ``target`` that is a module."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every efla import of ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(_resolve(a.name), [], node.lineno) for a in node.names if a.name.split(".")[0] == "efla"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] != "efla":
                continue
            for alias in node.names:  # "from efla.x import y" takes the module efla.x.y where y is one
                sub = f"{base}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in MODULES else (_resolve(base), [alias.name], node.lineno))
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_tier():
    unknown = [m for m in MODULES if m not in BASE | FACADE and m.split(".")[1] not in _PACKAGE_TIER]
    assert not unknown, f"modules outside the tiers {TIERS}: {unknown}; add their package to _PACKAGE_TIER"


def test_imports_point_down_the_tiers():
    upward = []
    for module, imports in GRAPH.items():
        for target, _, line in imports:
            if module in FACADE or target == module:
                continue
            if module in BASE:
                upward.append(f"{module}:{line} imports {target} (a base utility imports no efla module)")
                continue
            if target in BASE:
                continue
            low, high = _tier(module), _tier(target)
            if high is None:  # the facade: only the jobs and the commands use the public names from the root
                if TIERS.index(low) < TIERS.index("jobs"):
                    upward.append(f"{module}:{line} imports {target}; import from the module that defines the name")
            elif TIERS.index(high) > TIERS.index(low):
                upward.append(f"{module}:{line} ({low}) imports {target} ({high})")
    assert not upward, "imports against the tiers:\n" + "\n".join(upward)


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for module, imports in GRAPH.items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_")] if target != module else []
            crossing += [f"{module}:{line} imports {target}.{n}" for n in private]
        tree = ast.parse(MODULES[module].read_text())
        aliases = {}  # local names bound to efla modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("efla"):
                aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not crossing, "private names used across modules:\n" + "\n".join(crossing)


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    edges = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    cycles = [c for c in _cycles() if not set(c) <= FACADE]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, message", [
    ("from efla.models.generation import x", "imports efla.models.generation"),
])
def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch, source, message):
    # a layer importing a models-tier module is reported (guards the checker itself against matching nothing)
    layer = SRC / "layers" / "attention.py"
    fake = tmp_path / "attention.py"
    fake.write_text(layer.read_text() + f"\n{source}\n")
    monkeypatch.setitem(MODULES, "efla.layers.attention", fake)
    monkeypatch.setitem(GRAPH, "efla.layers.attention", _imports("efla.layers.attention"))
    with pytest.raises(AssertionError, match=message):
        test_imports_point_down_the_tiers()
