"""The imports of efla.layers and efla.models, function-local ones included, point only down the tiers (ops ->
modules -> layers -> models -> train/eval/experiments/data -> commands), name no private ``_name`` of another module,
and form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import efla

SRC = Path(efla.__file__).resolve().parent.parent
TIERS = [{"ops"}, {"modules"}, {"layers"}, {"models"}, {"train", "eval", "experiments", "data"}]
CHECKED = {"layers", "models"}


def _tier(module: str) -> int:
    """A module's tier; the package's top-level modules (efla.device, efla.variants, ...) are the base of all."""
    parts = module.split(".")
    if len(parts) < 2 or not (SRC / "efla" / parts[1]).is_dir():
        return -1
    return next((i for i, names in enumerate(TIERS) if parts[1] in names), len(TIERS))


def _imports() -> dict[str, list[tuple[str, str | None]]]:
    """module -> the (efla module, imported name) pairs of all its import statements."""
    found = {}
    for path in sorted((SRC / "efla").glob("**/*.py")):
        module = ".".join(path.with_suffix("").relative_to(SRC).parts).removesuffix(".__init__")
        pairs = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                pairs += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                pairs += [(alias.name, None) for alias in node.names]
        found[module] = [(target, name) for target, name in pairs if target.split(".")[0] == "efla"]
    return found


def _checked(module: str) -> bool:
    return module.split(".")[1:2] and module.split(".")[1] in CHECKED


def test_layers_and_models_import_only_downwards_and_no_private_names():
    wrong = [f"{module} -> {target}{'' if name is None else '.' + name}"
             for module, pairs in _imports().items() if _checked(module)
             for target, name in pairs
             if _tier(target) > _tier(module) or (name or "").startswith("_")]
    assert not wrong


def test_layers_and_models_have_no_import_cycle():
    graph = {module: {target for target, _ in pairs if target in _imports()} for module, pairs in _imports().items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            if target in path:
                cycles.append([*path[path.index(target):], target])
            elif _checked(target) and target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in filter(_checked, graph):
        if module not in done:
            visit(module, [module])
    assert not cycles
