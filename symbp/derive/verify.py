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

from ..declare.forms import Array, FirstArgmax, Forward, WindowMax
from .kinks import differentiate
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
        self.ordering: dict[sp.Symbol, sp.Expr] = {}

    def symbols_for(self, array: Array, prefix: str = "", ordered: bool = False) -> None:
        """A symbol per element; ``ordered``: ``t + k`` with distinct integers k, so that
        comparisons between elements (a max-pooling window's arg-max) are decided."""
        table = {}
        positions = list(_positions(array, self.sizes))
        ranks = list(range(len(positions)))
        random.Random(len(positions)).shuffle(ranks)
        base = sp.Symbol("t", real=True)
        for rank, position in zip(ranks, positions, strict=True):
            label = "_".join([prefix + array.name, *map(str, position)])
            table[position] = sp.Symbol(label, real=True, positive=array.positive or None)
            if ordered:  # compared (and finally evaluated) at t + rank
                self.ordering[table[position]] = base + rank
        self.tables[prefix + array.name] = table

    def expand(self, expr: sp.Expr, binding: dict[sp.Symbol, int]) -> sp.Expr:
        if isinstance(expr, sp.Sum):
            body, limits = expr.function, expr.limits
            ranges = []
            for index, low, high in limits:
                ranges.append(
                    (index, range(self._integer(low, binding), self._integer(high, binding) + 1))
                )
            total = sp.Integer(0)
            for values in itertools.product(*[r for _, r in ranges]):
                inner = dict(binding)
                inner.update({index: v for (index, _), v in zip(ranges, values, strict=True)})
                total += self.expand(body, inner)
            return total
        if isinstance(expr, sp.Indexed):
            position = tuple(self._integer(i, binding) for i in expr.indices)
            # Outside its range an array reads 0 (zero padding, windows at the border).
            return self.tables[expr.base.name].get(position, sp.Integer(0))
        if isinstance(expr, WindowMax):
            return sp.Max(*self._window_values(expr, binding))
        if isinstance(expr, FirstArgmax):
            window, point = expr.args[0], expr.args[1:]
            values = [v.xreplace(self.ordering) for v in self._window_values(window, binding)]
            best = max(range(len(values)), key=lambda k: (values[k] - values[0], -k))
            offsets = list(itertools.product(*[range(r) for r in self._ranges(window, binding)]))
            here = tuple(self._integer(p, binding) for p in point)
            return sp.Integer(1 if offsets[best] == here else 0)
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


    def _integer(self, expr, binding) -> int:
        values = {**{k: sp.Integer(v) for k, v in binding.items()},
                  **{k: sp.Integer(v) for k, v in self.sizes.items()}}
        return int(sp.sympify(expr).xreplace(values))

    def _ranges(self, window, binding):
        return [self._integer(high - low + 1, binding) for _, low, high in window.limits]

    def _window_values(self, window, binding):
        values = []
        for offsets in itertools.product(*[range(r) for r in self._ranges(window, binding)]):
            inner = dict(binding)
            inner.update(zip(window.variables, offsets, strict=True))
            values.append(self.expand(window.function, inner))
        return values


def _positions(array: Array, sizes: dict[sp.Symbol, int]):
    shape = [int(sp.sympify(d).xreplace(sizes)) for d in array.dims]
    return itertools.product(*[range(s) for s in shape])


def expand_forward(form: Forward, sizes: dict[sp.Symbol, int]) -> _Expander:
    """Symbols for the inputs, parameters and auxiliaries; stage values as their expressions."""
    expander = _Expander(sizes)
    ordered = any(stage.expr.has(WindowMax) for stage in form.stages)
    for array in form.inputs + form.params + form.aux:
        expander.symbols_for(array, ordered=ordered and array in form.inputs)
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
            expected = differentiate(contraction, element)
            if not is_zero((expected - value).xreplace(expander.ordering)):
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
    """Small concrete sizes for every symbolic size (and structural constant) the form uses."""
    sizes: dict[sp.Symbol, int] = {}
    for symbol in form.constants:
        if symbol.is_integer:  # stride, padding, dilation: structure, so concrete here
            sizes[symbol] = {"stride": 2, "padding": 1}.get(symbol.name, 1)
    for symbol in form.window_dims:
        sizes[symbol] = 2
    for array in form.arrays.values():
        for dim in array.dims:
            for symbol in sp.sympify(dim).free_symbols:
                if symbol in sizes or symbol in form.size_rules:
                    continue
                if symbol.name == "N":
                    sizes[symbol] = batch
                elif symbol in form.window_dims:
                    sizes[symbol] = 2
                elif symbol.name in ("H_in", "W_in"):
                    sizes[symbol] = 4
                else:
                    sizes[symbol] = width + (len(sizes) + 1) % 2
    for symbol, rule in form.size_rules.items():
        sizes[symbol] = int(rule.xreplace(sizes))
    return sizes
