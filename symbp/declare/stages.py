"""Safe parsing of a layer's forward written as stages in index notation.

A stage reads ``name[i, j, ...] = expression``: the array it defines, indexed by its free
indices, and an expression over the layer's input ``x``, its parameters, its constants, its
sizes and the stages before it. ``sum(expr, j)`` (or ``sum(expr, j, k)``) sums over ``j``;
``mean(expr, j)`` divides that sum by ``j``'s size. Every index's range is read from where it
indexes an array: ``j`` in ``x[n, j]`` runs over the input's second axis.

The text goes through Python's :mod:`ast` parser and a whitelist of node types (the same
arithmetic and functions as user activations, :mod:`.expr`, plus subscripts, ``sum`` and
``mean``); it is never given to ``eval``, ``sympify`` or ``parse_expr``. Every problem is a
one-line :class:`SpecError`.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

import sympy as sp

from ..errors import SpecError
from .expr import (
    _BINARY,
    CONSTANTS,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_LENGTH,
    VARIADIC,
    _check_power,
    _depth,
    _Floats,
)
from .forms import Array, index

#: The reductions a stage may call, besides the element-wise :data:`~.expr.FUNCTIONS`.
REDUCTIONS = ("sum", "mean")
#: Every name a stage may call.
CALLABLE = tuple(sorted({*FUNCTIONS, *REDUCTIONS}))


@dataclass
class Names:
    """What the names in a layer's stages stand for (everything but indices)."""

    arrays: dict[str, Array]  # the input, the parameters and the stages defined so far
    sizes: dict[str, sp.Symbol]  # the batch N, the input's sizes and declared sizes
    constants: dict[str, sp.Symbol]
    later: set[str] = field(default_factory=set)  # stages defined after the current one
    params: set[str] = field(default_factory=set)
    shapes: dict[str, str] = field(default_factory=dict)  # a parameter's shape as written

    def known(self) -> str:
        return ", ".join(sorted({*self.arrays, *self.sizes, *self.constants, *CONSTANTS}))


def parse_stage(text: object) -> tuple[str, tuple[str, ...], ast.expr]:
    """The name, the index names and the right-hand side of ``name[i, j] = expression``,
    checked against the whitelist of node types; no meaning is given to names yet."""
    if not isinstance(text, str):
        raise SpecError(f"a stage is a string 'name[n, j] = expression', got {text!r}")
    if len(text) > MAX_LENGTH:
        raise SpecError(f"is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="exec")
    except SyntaxError as err:
        raise SpecError(f"{text!r} is not valid syntax: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise SpecError("the expression is nested too deeply for Python's parser") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign):
        raise SpecError(f"{text!r} is not one stage 'name[n, j] = expression'")
    assign = tree.body[0]
    target = assign.targets[0]
    if len(assign.targets) != 1 or not (
        isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
    ):
        raise SpecError(
            f"{text!r}: the left side must be an array with its indices, as y[n, j]"
        )
    indices = _subscript_names(target)
    if len(set(indices)) != len(indices):
        raise SpecError(f"{text!r}: an index appears twice on the left side")
    if _depth(assign.value) > MAX_DEPTH:
        raise SpecError(f"{text!r} nests functions and powers more than {MAX_DEPTH} deep")
    for node in ast.walk(assign.value):
        _check_node(node)
    return target.value.id, indices, assign.value


def _subscript_names(node: ast.Subscript) -> tuple[str, ...]:
    """The index names of ``a[i, j]``; a subscript holds index names and nothing else."""
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    names = []
    for item in items:
        if not isinstance(item, ast.Name):
            raise SpecError(
                f"subscript [{ast.unparse(item)}] of {ast.unparse(node.value)}: subscripts are "
                "index names (x[n, j]), not expressions or numbers"
            )
        if not _INDEX.match(item.id):
            raise SpecError(
                f"index {item.id!r} of {ast.unparse(node.value)}: an index name is ASCII letters, "
                "digits and '_', starting with a letter"
            )
        names.append(item.id)
    return tuple(names)


_INDEX = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


_ALLOWED = (
    ast.Constant, ast.Name, ast.Load, ast.UnaryOp, ast.UAdd, ast.USub, ast.BinOp, ast.Add,
    ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Call, ast.Subscript, ast.Tuple,
)


def _check_node(node: ast.AST) -> None:
    """Refuse a node outside the whitelist (attributes, lambdas, comprehensions, ...)."""
    if isinstance(node, ast.Attribute):
        raise SpecError(f"attribute access ({ast.unparse(node)}) is not allowed")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise SpecError("'^' is not a power; write a**2")
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            raise SpecError(f"attribute access ({ast.unparse(node.func)}) is not allowed")
        if not isinstance(node.func, ast.Name) or node.func.id not in CALLABLE:
            func = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise SpecError(
                f"function {func!r} is not allowed (allowed: {', '.join(CALLABLE)})"
            )
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise SpecError(f"{node.func.id}() takes positional arguments only")
    if isinstance(node, ast.Subscript) and not isinstance(node.value, ast.Name):
        raise SpecError(f"{ast.unparse(node)}: only a named array can be indexed")
    if not isinstance(node, _ALLOWED):
        raise SpecError(f"{type(node).__name__} is not allowed in a stage")


@dataclass
class _Use:
    index: str
    dim: sp.Expr
    where: str  # the subscript as written, ``gamma[j]``
    array: str


class StageBuilder:
    """Builds one stage's right-hand side as a sympy expression, checking every name, index
    and range on the way (see :func:`build_stage`)."""

    def __init__(self, names: Names, stage: str, free: tuple[str, ...]) -> None:
        self.names = names
        self.stage = stage
        self.free = free
        self.uses: list[_Use] = []
        self.summed: list[str] = []  # the indices of the sums around the current node
        self.floats = _Floats()

    def build(self, node: ast.expr) -> sp.Expr:
        return self.floats.check(self._build(node))

    def _build(self, node: ast.expr) -> sp.Expr:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SpecError(f"only numbers are allowed as constants, not {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError("a number in the stage is beyond the float64 range")
            return sp.Integer(value) if isinstance(value, int) else sp.Rational(repr(value))
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Subscript):
            return self._subscript(node)
        if isinstance(node, ast.UnaryOp):
            operand = self.build(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            left, right = self.build(node.left), self.build(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise SpecError("division by zero")
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise SpecError(f"{ast.unparse(node)} is not allowed in a stage")

    def _name(self, name: str) -> sp.Expr:
        names = self.names
        if name in names.constants:
            return names.constants[name]
        if name in names.sizes:
            return names.sizes[name]
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in names.arrays:
            array = names.arrays[name]
            if array.dims:
                raise SpecError(
                    f"{name} has {len(array.dims)} axes: write it with its indices "
                    f"({name}[{', '.join('i' * len(array.dims))}] with index names)"
                )
            return array[()]
        self._not_defined_yet(name)
        if name in self.free or name in self.summed:
            raise SpecError(f"index {name!r} is used as a number; indices go in subscripts")
        raise SpecError(
            f"unknown name {name!r}: not a size of the input or of a parameter, a constant, a "
            f"parameter or an earlier stage (known: {names.known()})"
        )

    def _named(self, name: str) -> bool:
        """Whether ``name`` is a size, a constant or an array (a stage, later ones too), which
        no index may be called."""
        names = self.names
        return name == self.stage or any(
            name in group for group in (names.sizes, names.constants, names.arrays, names.later)
        )

    def _not_defined_yet(self, name: str) -> None:
        if name == self.stage:
            raise SpecError(f"stage {name!r} reads itself")
        if name in self.names.later:
            raise SpecError(
                f"reads {name!r}, which a later stage defines (stages run in order)"
            )

    def _subscript(self, node: ast.Subscript) -> sp.Expr:
        name = node.value.id
        indices = _subscript_names(node)
        if name not in self.names.arrays:
            self._not_defined_yet(name)
            what = (
                "a size" if name in self.names.sizes
                else "a constant" if name in self.names.constants
                else "an unknown name"
            )
            raise SpecError(
                f"{ast.unparse(node)}: {name!r} is {what}, not an array "
                f"(arrays: {', '.join(sorted(self.names.arrays))})"
            )
        array = self.names.arrays[name]
        written = ast.unparse(node)
        twice = sorted({item for item in indices if indices.count(item) > 1})
        if twice:  # the engine eliminates one index per Kronecker delta; a diagonal needs two
            raise SpecError(
                f"{written}: index {twice[0]!r} appears twice in one subscript (a diagonal), "
                "which symbp does not derive"
            )
        if len(indices) != len(array.dims):
            shape = self.names.shapes.get(name)
            declared = f" (declared {shape!r})" if shape is not None else ""
            raise SpecError(
                f"{written}: {name} has {len(array.dims)} "
                f"{'axis' if len(array.dims) == 1 else 'axes'}{declared}, "
                f"but {len(indices)} {'index is' if len(indices) == 1 else 'indices are'} given"
            )
        symbols = []
        for item, dim in zip(indices, array.dims, strict=True):
            if self._named(item):
                raise SpecError(
                    f"{written}: {item!r} is not an index name (it names a size, a constant or "
                    "an array)"
                )
            if item in FUNCTIONS or item in REDUCTIONS or item in CONSTANTS:
                raise SpecError(f"{written}: {item!r} is reserved and cannot be an index")
            self.uses.append(_Use(item, dim, written, name))
            symbols.append(index(item))
        return array[tuple(symbols)]

    def _call(self, node: ast.Call) -> sp.Expr:
        func = node.func.id
        if func in REDUCTIONS:
            return self._reduction(node)
        if func not in VARIADIC and len(node.args) != 1:
            raise SpecError(f"{func}() takes one argument, got {len(node.args)}")
        args = [self.build(arg) for arg in node.args]
        try:
            return FUNCTIONS[func](*args)
        except (TypeError, ValueError) as err:
            raise SpecError(f"bad call {ast.unparse(node)}: {err}") from None

    def _reduction(self, node: ast.Call) -> sp.Expr:
        func = node.func.id
        written = ast.unparse(node)
        if len(node.args) < 2 or not all(isinstance(a, ast.Name) for a in node.args[1:]):
            raise SpecError(
                f"{written}: {func}() takes an expression and the indices it runs over, "
                f"as {func}(x[n, j], j)"
            )
        over = [a.id for a in node.args[1:]]
        for name in over:
            if name in self.free:
                raise SpecError(
                    f"{written}: index {name!r} is on the left side, so it cannot be summed "
                    "over; sum over another index name"
                )
            if name in self.summed or over.count(name) > 1:
                raise SpecError(f"{written}: index {name!r} is summed over twice")
            if self._named(name):
                raise SpecError(
                    f"{written}: {name!r} is not an index name (it names a size, a constant or "
                    "an array)"
                )
        start = len(self.uses)
        self.summed.extend(over)
        body = self.build(node.args[0])
        del self.summed[len(self.summed) - len(over):]
        inner, self.uses[start:] = self.uses[start:], [
            use for use in self.uses[start:] if use.index not in over
        ]
        limits = []
        for name in over:
            dim = _range(name, [use for use in inner if use.index == name], self.names)
            if dim is None:
                raise SpecError(
                    f"{written}: sums over {name!r}, but no array inside the sum is indexed "
                    f"by {name!r}"
                )
            limits.append((index(name), 0, dim - 1))
        total = sp.Sum(body, *limits)
        if func == "mean":
            total = total / sp.Mul(*[limit[2] + 1 for limit in limits])
        return total


def _range(name: str, uses: list[_Use], names: Names) -> sp.Expr | None:
    """The size index ``name`` runs over, the same in each of its ``uses``; None if unused."""
    if not uses:
        return None
    first = uses[0]
    for use in uses[1:]:
        if use.dim != first.dim:
            note = ""
            for each in (first, use):
                if each.array in names.params:
                    note = f" (check {each.array}'s shape {names.shapes[each.array]!r})"
            raise SpecError(
                f"index {name!r} runs over {first.dim} in {first.where} but over {use.dim} in "
                f"{use.where}{note}"
            )
    return first.dim


def build_stage(
    names: Names, stage: str, free: tuple[str, ...], rhs: ast.expr
) -> tuple[sp.Expr, tuple[sp.Expr, ...]]:
    """The sympy right-hand side of ``stage[free] = rhs`` and the size each free index runs
    over, once every index is bound and every range agrees."""
    builder = StageBuilder(names, stage, free)
    try:
        expr = builder.build(rhs)
    except RecursionError:  # a chain of a thousand operators: Python's stack, not a reason
        raise SpecError("the expression is nested too deeply (split it into stages)") from None
    for use in builder.uses:
        if use.index not in free:
            raise SpecError(
                f"index {use.index!r} in {use.where} is neither on the left side nor summed "
                f"over (sum({use.where}, {use.index}))"
            )
    dims = []
    for name in free:
        dim = _range(name, [use for use in builder.uses if use.index == name], names)
        if dim is None:
            raise SpecError(
                f"index {name!r} is on the left side but not bound: no array on the right is "
                f"indexed by {name!r}, so its range is unknown"
            )
        dims.append(dim)
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise SpecError("the stage is undefined (division by zero?)")
    return expr, tuple(dims)
