"""Prove derived formulas exact by an independent route: scalar expansion at small sizes.

For concrete sizes (batch 2..4, widths 2..3) every array element becomes its own sympy symbol,
every sum an explicit addition, and every stage a plain scalar expression of the inputs. The
loss-side contraction ``L = sum(dy * y)`` is then differentiated *directly*, element by element,
with sympy's scalar ``diff`` -- no index algebra, no delta elimination, no rewriting. The engine's
whole-array formula, expanded the same way, must equal it: the difference must simplify to 0.

Where a formula has kinks (``Max``, ``Heaviside``, ``Piecewise``), the proof is done branch by
branch: each element that appears in a kink condition is taken positive, negative and zero.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import sympy as sp

from ..declare.forms import Array, Forward
from .kinks import apply_kink_convention
from .layer import Adjoint, LayerDerivation, adjoint_array

MAX_BRANCH_SYMBOLS = 6


@dataclass
class Verdict:
    """The outcome for one formula at one set of sizes."""

    name: str
    sizes: dict[str, int]
    proven: bool
    detail: str = ""


class _Expander:
    """Turns index expressions into scalar expressions at concrete sizes."""

    def __init__(self, sizes: dict[sp.Symbol, int]):
        self.sizes = sizes
        self.tables: dict[str, dict[tuple[int, ...], sp.Expr]] = {}

    def symbols_for(self, array: Array, prefix: str = "") -> None:
        table = {}
        shape = [self.sizes[d] for d in array.dims]
        for position in itertools.product(*[range(s) for s in shape]):
            label = "_".join([prefix + array.name, *map(str, position)])
            table[position] = sp.Symbol(label, real=True, positive=array.positive or None)
        self.tables[prefix + array.name] = table

    def expand(self, expr: sp.Expr, binding: dict[sp.Symbol, int]) -> sp.Expr:
        if isinstance(expr, sp.Sum):
            body, limits = expr.function, expr.limits
            ranges = []
            for index, low, high in limits:
                low = int(low.xreplace(self.sizes).xreplace(binding))
                high = int(high.xreplace(self.sizes).xreplace(binding))
                ranges.append((index, range(low, high + 1)))
            total = sp.Integer(0)
            for values in itertools.product(*[r for _, r in ranges]):
                inner = dict(binding)
                inner.update({index: v for (index, _), v in zip(ranges, values, strict=True)})
                total += self.expand(body, inner)
            return total
        if isinstance(expr, sp.Indexed):
            position = tuple(int(sp.sympify(i).xreplace(binding)) for i in expr.indices)
            return self.tables[expr.base.name][position]
        if isinstance(expr, sp.Symbol):
            if expr in binding:
                return sp.Integer(binding[expr])
            if expr in self.sizes:
                return sp.Integer(self.sizes[expr])
            if expr.name in self.tables and () in self.tables[expr.name]:
                return self.tables[expr.name][()]
            return expr
        if not expr.args:
            return expr
        return expr.func(*[self.expand(arg, binding) for arg in expr.args])


def _positions(array: Array, sizes: dict[sp.Symbol, int]):
    return itertools.product(*[range(sizes[d]) for d in array.dims])


def expand_forward(form: Forward, sizes: dict[sp.Symbol, int]) -> _Expander:
    """Symbols for the inputs, parameters and auxiliaries; stage values as their expressions."""
    expander = _Expander(sizes)
    for array in form.inputs + form.params + form.aux:
        expander.symbols_for(array)
    for stage in form.stages:
        table = {}
        for position in _positions(stage.array, sizes):
            binding = dict(zip(stage.indices, position, strict=True))
            table[position] = expander.expand(stage.expr, binding)
        expander.tables[stage.name] = table
    upstream = adjoint_array(form.output.array)
    if form.output.array.dims:
        expander.symbols_for(upstream)
    else:
        expander.tables[upstream.name] = {(): sp.Integer(1)}
    return expander


def verify_layer(
    derivation: LayerDerivation, sizes: dict[sp.Symbol, int], *, staged: bool = False
) -> list[Verdict]:
    """Check every VJP (compact, or with ``staged`` the staged chain) against direct ``diff``."""
    form = derivation.form
    expander = expand_forward(form, sizes)
    output = form.output
    upstream = expander.tables[adjoint_array(output.array).name]
    contraction = sp.Add(
        *[upstream[p] * expander.tables[output.name][p] for p in expander.tables[output.name]]
    )
    adjoints: dict[str, Adjoint]
    if staged:
        for adjoint in derivation.staged:  # in computation order
            _table_of(expander, adjoint, sizes)
        adjoints = {a.array.name: a for a in derivation.staged}
    else:
        adjoints = derivation.vjp
    verdicts = []
    named_sizes = {str(k): v for k, v in sizes.items()}
    for array in form.differentiable:
        adjoint = adjoints[array.name]
        table = _table_of(expander, adjoint, sizes)
        failures = []
        for position, value in table.items():
            element = expander.tables[array.name][position]
            # The value at a kink is a convention, the same one the engine applies.
            expected = apply_kink_convention(sp.diff(contraction, element))
            if not is_zero(expected - value):
                failures.append(position)
        detail = "" if not failures else f"differs at {failures[:3]}"
        verdicts.append(Verdict(adjoint.name, named_sizes, not failures, detail))
    return verdicts


def _table_of(expander: _Expander, adjoint: Adjoint, sizes) -> dict:
    table = {}
    for position in _positions(adjoint.array, sizes):
        binding = dict(zip(adjoint.indices, position, strict=True))
        table[position] = expander.expand(adjoint.expr, binding)
    expander.tables[adjoint.name] = table
    return table


# -- proving a scalar expression zero ---------------------------------------------------------
_KINKED = (sp.Heaviside, sp.Max, sp.Min, sp.Piecewise, sp.sign, sp.Abs)


def is_zero(expr: sp.Expr) -> bool:
    """True only if ``expr`` is proven identically zero (branch by branch at kinks)."""
    expr = sp.sympify(expr)
    kink_symbols = sorted(_kink_symbols(expr), key=sp.default_sort_key)
    if kink_symbols and len(kink_symbols) <= MAX_BRANCH_SYMBOLS:
        for signs in itertools.product((1, -1, 0), repeat=len(kink_symbols)):
            cases = {}
            for symbol, sign in zip(kink_symbols, signs, strict=True):
                if sign == 0:
                    cases[symbol] = sp.Integer(0)
                else:
                    cases[symbol] = sp.Symbol(symbol.name, positive=sign > 0, negative=sign < 0)
            if not _smooth_zero(expr.xreplace(cases)):
                return False
        return True
    return _smooth_zero(expr)


def _kink_symbols(expr: sp.Expr) -> set[sp.Symbol]:
    found: set[sp.Symbol] = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, _KINKED):
            found |= node.free_symbols
    return found


def _smooth_zero(expr: sp.Expr) -> bool:
    if expr == 0:
        return True
    if _numerically_nonzero(expr):
        return False
    expanded = sp.expand(expr)
    if expanded == 0:
        return True
    together = sp.cancel(sp.together(expanded))
    if together == 0:
        return True
    return sp.simplify(together) == 0


def _numerically_nonzero(expr: sp.Expr, trials: int = 3) -> bool:
    """A quick refutation: clearly nonzero at random points (consistent with assumptions)."""
    rng = random.Random(0)
    symbols = sorted(expr.free_symbols, key=sp.default_sort_key)
    for _ in range(trials):
        values = {}
        for s in symbols:
            magnitude = rng.uniform(0.3, 1.7)
            values[s] = (
                -magnitude
                if s.is_negative
                else magnitude
                if (s.is_positive or rng.random() < 0.5)
                else -magnitude
            )
        try:
            value = complex(expr.xreplace(values).evalf(30))
        except (TypeError, ValueError):
            return False
        if abs(value) > 1e-12:
            return True
    return False


def default_sizes(form: Forward, batch: int = 2, width: int = 2) -> dict[sp.Symbol, int]:
    """Small concrete sizes for every symbolic size the form uses."""
    sizes: dict[sp.Symbol, int] = {}
    for array in form.arrays.values():
        for dim in array.dims:
            if dim not in sizes:
                sizes[dim] = batch if dim.name == "N" else width + (len(sizes) + 1) % 2
    return sizes
