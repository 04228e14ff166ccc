"""Search spaces: a YAML mapping of dotted job-spec keys to distributions.

    training.lr: {loguniform: [1.0e-5, 1.0e-3]}
    training.batch_size: {choice: [4, 8]}
    method.lora.rank: {grid: [4, 8, 16]}
    method.lora.alpha: {expr: "2 * method.lora.rank"}
    training.warmup_steps: 10            # a plain value: fixed for every trial

Every key and every value a distribution can produce is checked against the job spec before
anything launches, so a typo costs a second, not a cluster.
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec, build_spec, read_yaml, set_dotted
from ftcluster.core.errors import SpecError

RANGE_KINDS = ("uniform", "loguniform", "quniform", "randint")
KINDS = (*RANGE_KINDS, "choice", "grid", "expr")
# How many random complete samples are validated on top of every single value.
COMBINATIONS_CHECKED = 16


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution kind and arguments (e.g. loguniform, [1e-5, 1e-3])."""

    path: str
    kind: str
    args: Any

    def domain(self):
        """The Ray Tune domain of this parameter (expressions and grids have none)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "quniform":
            return tune.quniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # inclusive upper bound, like the YAML reads
        if self.kind == "choice":
            return tune.choice(self.args)
        raise ValueError(f"{self.kind} has no Ray Tune domain")

    def edge_values(self) -> list[Any]:
        """The values validation tries: every choice, or a range's bounds."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return list(self.args[:2])


@dataclass
class SearchSpace:
    """A parsed, validated search space over one job spec."""

    source: str
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.kind not in ("grid", "expr")]

    @property
    def grid(self) -> list[Param]:
        return [p for p in self.params if p.kind == "grid"]

    @property
    def expressions(self) -> list[Param]:
        return [p for p in self.params if p.kind == "expr"]

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid parameters (one empty point when there are none)."""
        keys = [p.path for p in self.grid]
        return [dict(zip(keys, values)) for values in itertools.product(*(p.args for p in self.grid))]

    def random_sample(self, rng: random.Random) -> dict[str, Any]:
        import numpy as np

        state = np.random.RandomState(rng.randrange(2**31))
        return {p.path: _plain(p.domain().sample(random_state=state)) for p in self.sampled}

    def resolve(self, chosen: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """Chosen values plus fixed values plus tied expressions, in file order."""
        values = {**self.fixed, **chosen}
        for param in self.expressions:
            values[param.path] = evaluate_expression(param.args, values, base, f"{self.source}: {param.path}")
        return values

    def trial_raw(self, base: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
        """The raw job spec of one trial: the base spec with this trial's values set."""
        raw = copy.deepcopy(base)
        for path, value in self.resolve(chosen, base).items():
            set_dotted(raw, path.split("."), copy.deepcopy(value), f"{self.source}: {path}")
        return raw


def _plain(value: Any) -> Any:
    """numpy scalars → Python numbers, so specs, YAML and JSON stay plain."""
    return value.item() if hasattr(value, "item") else value


# --- parsing -------------------------------------------------------------------------------------


def parse_param(source: str, path: str, value: Any) -> Param | None:
    """A distribution, or None for a plain (fixed) value."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        return None
    kind, args = next(iter(value.items()))
    where = f"{source}: {path}: {kind}"
    if kind in RANGE_KINDS:
        want = 3 if kind == "quniform" else 2
        if not isinstance(args, list) or len(args) != want or not all(_is_number(a) for a in args):
            shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
            raise SpecError(f"{where}: expected {shape} of numbers, got {args!r}")
        if not args[0] < args[1]:
            raise SpecError(f"{where}: low {args[0]} must be below high {args[1]}")
        if kind == "loguniform" and args[0] <= 0:
            raise SpecError(f"{where}: bounds must be positive, got {args[0]}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SpecError(f"{where}: bounds must be integers, got {args!r}")
    elif kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpecError(f"{where}: expected a non-empty list of values, got {args!r}")
    elif not isinstance(args, str) or not args.strip():
        raise SpecError(f"{where}: expected an expression string, e.g. \"2 * method.lora.rank\"")
    param = Param(path, kind, args)
    if kind not in ("grid", "expr"):
        try:
            param.domain()
        except (ValueError, TypeError) as exc:
            raise SpecError(f"{where}: {exc}") from None
    return param


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_space(path: str | Path, base: dict[str, Any]) -> SearchSpace:
    """Read a space file and check it against the raw job spec it will vary."""
    path = Path(path)
    raw = read_yaml(path)
    return parse_space(raw, str(path), base)


def parse_space(raw: dict[str, Any], source: str, base: dict[str, Any]) -> SearchSpace:
    params, fixed, problems = [], {}, []
    for key, value in raw.items():
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
            problems.append(f"{source}: {key!r}: keys are dotted spec paths, e.g. training.lr")
            continue
        if key in ("name", "output.dir", "output") or key.startswith("output."):
            problems.append(f"{source}: {key}: set by the sweep for every trial, it cannot be searched")
            continue
        try:
            param = parse_param(source, key, value)
        except SpecError as exc:
            problems.append(str(exc))
            continue
        if param is None:
            fixed[key] = value
        else:
            params.append(param)
    if problems:
        raise SpecError("\n".join(problems))
    if not params:
        raise SpecError(f"{source}: no distributions (uniform, loguniform, quniform, randint, choice, grid, expr): "
                        "nothing to search")
    space = SearchSpace(source, params, fixed)
    check_against_spec(space, base)
    return space


# --- validation against the job spec -------------------------------------------------------------


def check_against_spec(space: SearchSpace, base: dict[str, Any]) -> None:
    """Every value each key can take must give a valid spec; so must random complete samples."""
    problems: list[str] = []
    neutral = {p.path: p.edge_values()[0] for p in (*space.sampled, *space.grid)}
    problem = _first_problem(space, base, neutral)
    if problem:  # a fixed value, or an expression, is wrong whatever is chosen
        raise SpecError(f"{space.source}: {problem}")
    for param in (*space.sampled, *space.grid):
        for value in param.edge_values():
            problem = _first_problem(space, base, {**neutral, param.path: value})
            if problem:
                problems.append(f"{space.source}: {param.path}: value {value!r}: {problem}")
                break
    if not problems:
        rng = random.Random(0)
        points = space.grid_points()
        for _ in range(COMBINATIONS_CHECKED):
            chosen = {**space.random_sample(rng), **rng.choice(points)}
            problem = _first_problem(space, base, chosen)
            if problem:
                problems.append(f"{space.source}: the combination {chosen} is invalid: {problem}")
                break
    if problems:
        raise SpecError("\n".join(dict.fromkeys(problems)))


def _first_problem(space: SearchSpace, base: dict[str, Any], chosen: dict[str, Any]) -> str | None:
    try:
        build_spec(space.trial_raw(base, chosen), "spec")
    except SpecError as exc:  # reported by the caller with the space file's name
        return str(exc).splitlines()[0].removeprefix("spec: ").removeprefix(f"{space.source}: ")
    return None


def trial_spec(space: SearchSpace, base: dict[str, Any], chosen: dict[str, Any]) -> JobSpec:
    return build_spec(space.trial_raw(base, chosen), space.source)


# --- tied expressions ----------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Every intermediate result stays within this magnitude, so an expression such as 9 ** 9 ** 9 ** 9
# is refused at once instead of computing a number with billions of digits.
MAX_MAGNITUDE = 2.0**64


def _bounded(operation, left: Any, right: Any) -> Any:
    """Apply a binary operator to two numbers, refusing huge or non-finite results before they are built."""
    if not (_is_number(left) and _is_number(right)):
        raise TypeError(f"operands must be numbers, got {left!r} and {right!r}")
    if operation is operator.pow and abs(left) > 1 and abs(right) * math.log2(abs(left)) > 64:
        raise ValueError(f"{left} ** {right} is larger than 2**64")
    result = operation(left, right)
    if isinstance(result, complex) or not math.isfinite(result) or abs(result) > MAX_MAGNITUDE:
        raise ValueError(f"result {result!r} is not a finite number below 2**64")
    return result
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "int": int, "float": float, "round": round, "sqrt": math.sqrt}


MAX_EXPRESSION_CHARS = 500  # longer expressions are refused before Python parses them


def evaluate_expression(text: str, values: dict[str, Any], base: dict[str, Any], where: str) -> Any:
    """Arithmetic over numbers and dotted spec keys (this trial's values first, then the base spec).

    Only + - * / // % **, unary minus and min/max/int/float/round/sqrt: a space file cannot run code.
    """
    if len(text) > MAX_EXPRESSION_CHARS:  # (Python's parser runs out of memory on deep nesting: 100,000 minus signs)
        raise SpecError(f"{where}: expression {text[:40]!r}... is {len(text):,} characters long; an expression may "
                        f"have at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, MemoryError, RecursionError):
        raise SpecError(f"{where}: expression {text!r} is not valid arithmetic") from None

    def lookup(name: str) -> Any:
        if name in values:
            return values[name]
        node: Any = base
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SpecError(f"{where}: expression {text!r}: {name} is neither searched nor set in the job spec")
            node = node[part]
        return node

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return f"{head}.{node.attr}" if head else None
        return None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and _is_number(node.value):
            return node.value
        name = dotted(node)
        if name is not None:
            return lookup(name)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _bounded(_BINARY[type(node.op)], walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords:
            return _FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args))
        raise SpecError(f"{where}: expression {text!r}: {ast.unparse(node)!r} is not allowed "
                        "(numbers, spec keys, + - * / // % **, min, max, int, float, round, sqrt)")

    try:
        return walk(tree)
    except (TypeError, ZeroDivisionError, ValueError, OverflowError, RecursionError) as exc:
        raise SpecError(f"{where}: expression {text!r} failed: {type(exc).__name__ if isinstance(exc, RecursionError) else exc}") from None
