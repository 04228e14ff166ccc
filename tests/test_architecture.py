"""The package's layers are its folders: every import points down (or sideways within a folder),
there are no import cycles, no function is longer than a screen and a half, and private Ray imports
live in one place."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ftcluster"

# The folders of ftcluster/, lowest layer first (README.md, "How the code is organised", shows the
# same picture). A module may import its own folder or lower ones, never a higher one.
LAYERS = ("core", "config", "data", "models", "evaluation", "track", "runs", "objectives", "training",
          "planning", "launch", "sweep", "cluster", "results", "cli")
# The only modules outside a layer folder: the package itself, `python -m ftcluster`, and the
# built-in reward functions users name in their YAML (`ftcluster.rewards:NAME`).
TOP_LEVEL = {"ftcluster": "core", "ftcluster.rewards": "core", "ftcluster.__main__": "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index of the folder a module lives in (its first name under ftcluster)."""
    folder = TOP_LEVEL.get(module) or module.split(".")[1]
    assert folder in LAYERS, f"{module} belongs to no layer: add its folder to LAYERS"
    return LAYERS.index(folder)


def test_the_package_is_its_layer_folders():
    """`ls ftcluster/` shows the layers: every folder is a layer (a package), nothing else lies beside them."""
    entries = {path.name for path in PACKAGE.iterdir() if path.name != "__pycache__"}
    folders = {name for name in entries if (PACKAGE / name).is_dir()} - {"resources"}
    assert folders == set(LAYERS), f"folders not in LAYERS: {folders - set(LAYERS)}; missing: {set(LAYERS) - folders}"
    assert entries - folders - {"resources"} == {"__init__.py", "__main__.py", "rewards.py"}
    packages_without_init = [str(path.relative_to(REPO)) for path in PACKAGE.rglob("*")
                             if path.is_dir() and path.name not in ("__pycache__", "resources")
                             and not (path / "__init__.py").is_file()]
    assert not packages_without_init, packages_without_init


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
    allowed = {"ftcluster.core.quiet"}
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
    from ftcluster.core.quiet import quiet_ray_train_worker

    quiet_ray_train_worker()
