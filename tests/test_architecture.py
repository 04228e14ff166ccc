"""The package's layers: every import points down (or sideways within a layer), there are no import
cycles, no function is longer than a screen and a half, and private Ray imports live in one place."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ftcluster"

# Lowest first. A module may import modules of its own layer or of lower layers, never higher ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("ftcluster", "ftcluster.errors", "ftcluster.layout", "ftcluster.atomic", "ftcluster.accelerators", "ftcluster.registry",
              "ftcluster.storage", "ftcluster.locations",
              "ftcluster.interrupts", "ftcluster.quiet", "ftcluster.rewards")),
    ("spec", ("ftcluster.spec", "ftcluster.ds_config")),
    ("data, models, tracking", ("ftcluster.data", "ftcluster.models", "ftcluster.track", "ftcluster.tables",
                                "ftcluster.forgetting")),
    ("engine", ("ftcluster.engine", "ftcluster.eval_shard", "ftcluster.generation", "ftcluster.evaluate", "ftcluster.choices", "ftcluster.eval_suite", "ftcluster.harness", "ftcluster.plan", "ftcluster.capacity", "ftcluster.runs", "ftcluster.run_storage",
                "ftcluster.export", "ftcluster.compare")),
    ("launch", ("ftcluster.launch", "ftcluster.ray_loopback", "ftcluster.rollout")),
    ("sweeps, clusters, reports", ("ftcluster.sweep", "ftcluster.cluster", "ftcluster.report", "ftcluster.fetch")),
    ("command line", ("ftcluster.cli", "ftcluster.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def imports() -> dict[str, set[str]]:
    """Every ftcluster module imported by each module, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges = graph.setdefault(module_name(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ftcluster":
                edges.add(node.module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.split(".")[0] == "ftcluster")
    return graph


def test_imports_only_point_down():
    upward = [f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for source, targets in imports().items() for target in targets if layer_of(target) > layer_of(source)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = imports()
    modules = set(graph)

    def resolve(target: str) -> str:  # `from ftcluster.data import x` names the package ftcluster.data
        return target if target in modules else target.rsplit(".", 1)[0]

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(resolve(t) for t in graph.get(module, ())):
            if target == module or target == "ftcluster":
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_no_function_is_longer_than_80_lines_and_the_loop_fits_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80 or (path.name == "loop.py" and node.name == "run_steps" and length > 60):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_private_ray_imports_stay_in_one_module():
    """Ray's private modules (`ray.*._internal`, `ray._private`) change between releases; one module
    holds them, so an upgrade breaks one place (and the tests that run it)."""
    allowed = {"ftcluster.quiet"}
    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if (name.startswith("ray") and ("._internal" in name or "._private" in name or "._raylet" in name)
                        and module_name(path) not in allowed):
                    private.append(f"{path.relative_to(REPO)}: {name}")
    assert not private, "\n".join(private)


def test_quiet_still_finds_the_ray_loggers_it_silences():
    """quiet.py names Ray Train's loggers through private modules: this fails when an upgrade moves them."""
    from ftcluster.quiet import quiet_ray_train_worker

    quiet_ray_train_worker()
