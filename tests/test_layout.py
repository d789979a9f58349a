"""The package's shape, as the README's module map states it: no import cycles (function-level
imports included), packages import only downwards, Hydra only at the edge, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import dsee_cli

ROOT = Path(dsee_cli.__file__).parent
# Bottom to top (the most specific prefix places a module): a module imports only from its own
# layer and those before it. The training loop and the terminal/W&B sink sit below config,
# which assembles their sections; the run that reads the config sits above it.
LAYERS = ["errors", "atomic", "core", "data", "tuning", "pruning", "measure", "run.train", "reporting.tracking",
          "config", "run", "reporting", "cli"]


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) or "__init__"


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsee_cli"):
                target = node.module.removeprefix("dsee_cli").lstrip(".")
                for alias in node.names:  # `from dsee_cli.tuning import omega` imports a module
                    if f"{target}.{alias.name}".lstrip(".") in modules:
                        graph[name].add(f"{target}.{alias.name}".lstrip("."))
                if target in modules:
                    graph[name].add(target)
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: use absolute imports"
    return graph


def _layer(module: str) -> int:
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(matches, key=len)) if matches else -1


def test_there_are_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_packages_import_only_downwards():
    wrong = [(m, dep) for m, deps in _graph().items() for dep in deps
             if _layer(dep) > _layer(m) and m not in ("__main__", "__init__")]
    assert not wrong, f"imports against the layer order {LAYERS}: {wrong}"


def test_hydra_is_imported_only_by_the_command_line():
    users = [_name(p) for p in ROOT.rglob("*.py") if "hydra" in p.read_text() and "import" in p.read_text()
             and any(line.lstrip().startswith(("import hydra", "from hydra")) for line in p.read_text().splitlines())]
    assert users == ["cli"], users


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{_name(path)}.{node.name}: {length} lines")
    assert not long, long


def test_every_dotted_path_in_the_configs_resolves():
    """Hydra and logging import these by name at run time (`_target_`, `()`): a moved module breaks
    them only there, so they are checked here."""
    import importlib
    import re

    conf = Path(__file__).resolve().parents[1] / "conf"
    pattern = re.compile(r"(?:_target_|\(\)):\s*(dsee_cli[\w.]+)")
    paths = {m for f in conf.rglob("*.yaml") for m in pattern.findall(f.read_text())}
    assert len(paths) >= 2
    for path in paths:
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path
