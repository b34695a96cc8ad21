"""Index-notation algebra: sums over indices and Kronecker-delta elimination.

Layers declare their forward pass in index notation (``z[n, j] = Sum(x[n, k]*W[k, j], k) + b[j]``)
with symbolic sizes. Differentiating such an expression with respect to an array element
``x[p, q]`` (sympy does that part) leaves products of ``KroneckerDelta`` inside sums. sympy's own
``Sum(...).doit()`` cannot be used on ``Indexed`` terms (it crashes in gosper summation), so this
module does the bookkeeping itself:

* :func:`terms_of` flattens an expression into a list of :class:`Term` -- a product of factors
  under a (possibly empty) list of summation limits -- distributing products over sums and
  renaming bound indices so they never collide;
* :func:`eliminate_deltas` removes every ``KroneckerDelta`` that ties a bound index to another
  index (``Sum_k f(k) delta(k, q) = f(q)``);
* :func:`rebuild` turns terms back into sympy ``Sum`` objects, pulling every factor that does not
  depend on a bound index out of its sum, and naming bound indices canonically so that equal
  sums compare equal.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sympy as sp

Limit = tuple[sp.Symbol, sp.Expr, sp.Expr]

_fresh_counter = itertools.count()


def fresh_index(like: sp.Symbol) -> sp.Symbol:
    """A new integer index symbol that cannot clash with any declared one."""
    return sp.Symbol(f"{like.name}_{next(_fresh_counter)}", integer=True)


@dataclass(frozen=True)
class Term:
    """``Sum over limits of factor``; ``factor`` holds no top-level ``Sum``."""

    limits: tuple[Limit, ...]
    factor: sp.Expr

    @property
    def bound(self) -> set[sp.Symbol]:
        return {limit[0] for limit in self.limits}


def terms_of(expr: sp.Expr) -> list[Term]:
    """Flatten ``expr`` into terms: products distributed over sums, bound indices renamed."""
    if isinstance(expr, sp.Add):
        return [term for arg in expr.args for term in terms_of(arg)]
    if isinstance(expr, sp.Mul):
        result = [Term((), sp.Integer(1))]
        for arg in expr.args:
            result = [
                Term(left.limits + right.limits, left.factor * right.factor)
                for left in result
                for right in terms_of(arg)
            ]
        return result
    if isinstance(expr, sp.Sum):
        body = expr.function
        limits: list[Limit] = []
        for index, low, high in expr.limits:
            renamed = fresh_index(index)
            body = body.xreplace({index: renamed})
            limits.append((renamed, low, high))
        return [Term(tuple(limits) + term.limits, term.factor) for term in terms_of(body)]
    if isinstance(expr, sp.Piecewise):
        lifted = _lift_deltas(expr)
        if lifted is not expr:
            return terms_of(lifted)
    return [Term((), expr)]


def _lift_deltas(piecewise: sp.Piecewise) -> sp.Expr:
    """``Piecewise((d*a, c), (d*b, True))`` -> ``d*Piecewise((a, c), (b, True))`` for deltas d.

    A zero branch is ``d*0`` for any d, so it does not stop a delta from being lifted.
    """
    branches = [set(sp.Mul.make_args(value)) for value, _ in piecewise.args if value != 0]
    if not branches:
        return piecewise
    common = {
        factor for factor in set.intersection(*branches) if isinstance(factor, sp.KroneckerDelta)
    }
    if not common:
        return piecewise
    scale = sp.Mul(*common)
    return scale * sp.Piecewise(*[(value / scale, cond) for value, cond in piecewise.args])


def _solve_for_bound(delta: sp.KroneckerDelta, bound: set[sp.Symbol], scatter: bool):
    """If ``delta`` reads ``k == expr`` for a bound index k (coefficient +-1), return (k, expr).

    With ``scatter`` kept (the default), a delta that ties a free index to a combination of
    several bound ones (``u == p*S + i``, a strided convolution's input gradient) stays: it is
    a scatter over windows, which is how the array code computes it. ``scatter=False`` solves it
    anyway (``i = u - p*S``: the "full convolution with the flipped kernel" reading). A bound
    index that is one whole side (``u' == h*S + k``, a transposed convolution's input gradient)
    is solved in either case: the sum over it reads a window, ``dy[n, o, h*S + k]``.
    """
    difference = sp.expand(delta.args[0] - delta.args[1])
    for index in sorted(difference.free_symbols & bound, key=sp.default_sort_key):
        coefficient = difference.coeff(index)
        rest = difference - coefficient * index
        if coefficient not in (1, -1) or index in rest.free_symbols:
            continue
        if (scatter and rest.free_symbols & (bound - {index})
                and index not in delta.args):
            continue
        return index, sp.expand(-rest / coefficient)
    return None


def eliminate_deltas(term: Term, *, scatter: bool = True) -> Term:
    """Use each ``KroneckerDelta`` that involves a bound index to remove that sum."""
    limits = list(term.limits)
    factor = term.factor
    progress = True
    while progress:
        progress = False
        bound = {limit[0] for limit in limits}
        for delta in sp.Mul.make_args(factor):
            if not isinstance(delta, sp.KroneckerDelta):
                continue
            solved = _solve_for_bound(delta, bound, scatter)
            if solved is None:
                continue
            index, value = solved
            factor = (factor / delta).xreplace({index: value})
            limits = [limit for limit in limits if limit[0] != index]
            progress = True
            break
        if not progress:  # a group's floor read as its value may leave a delta to solve
            substituted = _substitute_equal_sides(factor, {limit[0] for limit in limits})
            progress, factor = substituted != factor, substituted
    return Term(tuple(limits), factor)


def _substitute_equal_sides(factor: sp.Expr, bound: set[sp.Symbol]) -> sp.Expr:
    """Under ``delta(a, b)`` with ``b`` the ``floor`` of bound indices (a group's
    ``floor(k*G/C)``, which no delta solves for ``k``) and ``a`` free of them, the other
    factors read ``a`` for ``b``: ``delta(g(c), g(k)) f(g(k)) = delta(g(c), g(k)) f(g(c))``."""
    for delta in sp.Mul.make_args(factor):
        if not isinstance(delta, sp.KroneckerDelta):
            continue
        first, second = delta.args
        if not first.free_symbols & bound:  # first: the side read under the sums
            first, second = second, first
        if not isinstance(first, sp.floor) or second.free_symbols & bound:
            continue
        rest = sp.Mul(*[f for f in sp.Mul.make_args(factor) if f is not delta])
        factor = delta * rest.xreplace({first: second})
    return factor


def _delta_count(factors: list[sp.Expr], limits: list[Limit]) -> sp.Expr | None:
    """``Sum_{k=0}^{C-1} delta(a, floor(k*G/C))`` alone: the ``C/G`` channels of a group."""
    if len(factors) != 1 or len(limits) != 1 or not isinstance(factors[0], sp.KroneckerDelta):
        return None
    (index, low, high), sides = limits[0], factors[0].args
    inner = [s for s in sides if isinstance(s, sp.floor) and index in s.free_symbols]
    if len(inner) != 1 or low != 0:
        return None
    rate = sp.simplify(inner[0].args[0] / index)
    if rate.has(index) or sp.simplify((high + 1) * rate - sp.floor((high + 1) * rate)) != 0:
        return None
    return 1 / rate


def _group_limits(factors: list[sp.Expr], limits: tuple[Limit, ...]):
    """Split a product under sums into independent (factors, limits) groups."""
    groups: list[tuple[list[sp.Expr], list[Limit]]] = []
    for limit in limits:
        groups.append(([], [limit]))
    outside: list[sp.Expr] = []
    for factor in factors:
        touched = [
            group for group in groups if any(lim[0] in factor.free_symbols for lim in group[1])
        ]
        if not touched:
            outside.append(factor)
            continue
        merged = (
            [f for group in touched for f in group[0]] + [factor],
            [lim for group in touched for lim in group[1]],
        )
        groups = [group for group in groups if not any(group is t for t in touched)]
        groups.append(merged)
    return outside, groups


def rebuild(terms: Iterable[Term], names: Mapping[sp.Expr, str] | None = None) -> sp.Expr:
    """Turn terms back into an expression, sums as small as they can be, bound indices named.

    ``names`` maps a limit's upper bound (``N - 1``) to the letter its bound index gets (``m``);
    without an entry, the index keeps its declared name stem.
    """
    total = sp.Integer(0)
    for term in terms:
        factors = list(sp.Mul.make_args(term.factor))
        outside, groups = _group_limits(factors, term.limits)
        value = sp.Mul(*outside)
        for group_factors, group_limits in groups:
            body = sp.Mul(*group_factors)
            if not group_factors:  # a sum of 1: the number of terms
                value *= sp.Mul(*[high - low + 1 for _, low, high in group_limits])
                continue
            if body == 0:
                value = sp.Integer(0)
                continue
            count = _delta_count(group_factors, group_limits)
            if count is not None:
                value *= count
                continue
            value *= _canonical_sum(body, group_limits, names or {})
        total += value
    return total


def _canonical_sum(body: sp.Expr, limits: list[Limit], names: Mapping[sp.Expr, str]) -> sp.Expr:
    """A ``Sum`` whose bound indices get canonical names not clashing with free symbols."""
    taken = {s.name for s in body.free_symbols} - {lim[0].name for lim in limits}
    renames = {}
    ordered = []
    for index, low, high in sorted(limits, key=lambda lim: sp.default_sort_key(lim[2])):
        stem = names.get(high, index.name.split("_")[0])
        name = stem
        while name in taken:
            name += "'"
        taken.add(name)
        new = sp.Symbol(name, integer=True)
        renames[index] = new
        ordered.append((new, low, high))
    return sp.Sum(body.xreplace(renames), *ordered)


def simplify_indexed(
    expr: sp.Expr, names: Mapping[sp.Expr, str] | None = None, *, scatter: bool = True
) -> sp.Expr:
    """Flatten, eliminate deltas and rebuild: the normal form the engine works with."""
    return rebuild((eliminate_deltas(t, scatter=scatter) for t in terms_of(expr)), names)


def freshen_bound(expr: sp.Expr) -> sp.Expr:
    """Rename every bound index in ``expr`` to a fresh symbol (before substituting into it)."""

    def renamed(node: sp.Sum) -> sp.Sum:
        body = node.function
        limits = []
        for index, low, high in node.limits:
            new = fresh_index(index)
            body = body.xreplace({index: new})
            limits.append((new, low, high))
        return sp.Sum(body, *limits)

    return expr.replace(lambda node: isinstance(node, sp.Sum), renamed)


def sums_in(expr: sp.Expr) -> list[sp.Sum]:
    """Every ``Sum`` node in ``expr`` (outermost first)."""
    return [node for node in sp.preorder_traversal(expr) if isinstance(node, sp.Sum)]


def bound_renames(first: sp.Sum, second: sp.Sum) -> dict | None:
    """The renaming of ``first``'s bound indices to ``second``'s, limit by limit; None where
    their ranges differ."""
    if len(first.limits) != len(second.limits):
        return None
    renames = {}
    for (a, lo_a, hi_a), (b, lo_b, hi_b) in zip(first.limits, second.limits, strict=True):
        if lo_a != lo_b or hi_a != hi_b:
            return None
        renames[a] = b
    return renames


def sums_equal(first: sp.Sum, second: sp.Sum) -> bool:
    """Equal up to the names of their bound indices."""
    renames = bound_renames(first, second)
    return renames is not None and first.function.xreplace(renames) == second.function
