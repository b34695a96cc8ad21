"""The smallest proven-equal form of an element-wise derivative, for ``symbp derive``'s report.

:func:`simplest_form` tries a few sympy transforms and keeps one only where the verifier
proves it equal to the derived expression.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import sympy as sp

from ..derivation.budget import too_costly
from ..derivation.verify import is_zero

#: Expressions with more operations than this are shown as derived (simplify's time grows fast).
SIMPLIFY_MAX_OPS = 80


def simplest_form(expr: sp.Expr) -> sp.Expr:
    """The derivative as the engine derived it, or an equal form that is smaller (fewer
    operations by ``sympy.count_ops``, then fewer characters).

    Candidates: the terms of a sum grouped in pairs by ``factor_terms`` while that saves
    operations (mish: ``x*e**x*(1 - tanh(s)**2)/(e**x + 1) + tanh(s)``), and ``factor_terms``,
    ``together``, ``factor``, ``simplify`` of the whole. A candidate is taken only if the
    verifier proves it equal to the derived expression (:func:`symbp.derivation.verify.is_zero` of
    the difference). Only element-wise derivatives of at most :data:`SIMPLIFY_MAX_OPS`
    operations and no integer power beyond :data:`~symbp.derivation.budget.MAX_POWER` (simplify
    expands powers: (min(x, 1) + max(x, 2))**500 took 6 s) are tried, so that the time stays
    bounded; the result is deterministic."""
    if expr.has(sp.Sum) or sp.count_ops(expr) > SIMPLIFY_MAX_OPS or too_costly(expr):
        return expr
    best, cost = expr, _cost(expr)
    for candidate in _candidates(expr):
        candidate_cost = _cost(candidate)
        if candidate_cost < cost and is_zero(candidate - expr):
            best, cost = candidate, candidate_cost
    return best


def _cost(expr: sp.Expr) -> tuple[int, int]:
    """Fewer operations first, then fewer characters (``dy*(1 - y**2)`` over
    ``-dy*y**2 + dy``)."""
    return sp.count_ops(expr), len(sp.sstr(expr))


def _candidates(expr: sp.Expr) -> Iterator[sp.Expr]:
    factors = sp.Mul.make_args(expr)
    sums = [f for f in factors if f.is_Add]
    if len(sums) == 1:  # dy * (a sum): work on the sum, keep the other factors
        rest = sp.Mul(*[f for f in factors if f is not sums[0]])
        for candidate in _sum_candidates(sums[0]):
            yield rest * candidate
    for transform in (sp.factor_terms, sp.together, sp.factor, sp.simplify):
        try:
            yield transform(expr)
        except (sp.PolynomialError, NotImplementedError, TypeError, ValueError):
            continue


def _sum_candidates(total: sp.Expr) -> Iterator[sp.Expr]:
    """``total`` with pairs of its terms grouped by ``factor_terms`` while that saves
    operations (greedy, in a fixed order)."""
    terms = list(sp.Add.make_args(total))
    improved = True
    while improved and len(terms) > 1:
        improved = False
        for first, second in itertools.combinations(range(len(terms)), 2):
            grouped = sp.factor_terms(terms[first] + terms[second])
            if sp.count_ops(grouped) < sp.count_ops(terms[first]) + sp.count_ops(terms[second]):
                terms = [t for k, t in enumerate(terms) if k not in (first, second)] + [grouped]
                improved = True
                break
    yield sp.Add(*terms)
