"""Numerically stable rewrites, applied to index expressions before they are printed.

Each rewrite is exact (the value does not change) and gives a form whose printed code cannot
overflow: ``log(1 + exp(u))`` becomes ``Softplus(u)``, ``1/(1 + exp(-u))`` ``Sigmoid(u)``,
``1 - erf(u)`` ``Erfc(u)``, and a branch of a piecewise function that grows without bound
outside its own region is guarded. The softmax of a log-sum-exp stage is computed from the
stage's terms (:func:`softmax_form`).
"""

from __future__ import annotations

import sympy as sp

from ..declare.forms import WindowMax
from .arrays import Erfc, Sigmoid, Softplus


def stabilize(expr: sp.Expr) -> sp.Expr:
    """Exact rewrites of an index expression into forms whose printed code cannot overflow."""
    expr = expr.replace(_is_log1p_exp, lambda e: Softplus(_exp_argument(e.args[0])))
    expr = _sigmoid_form(expr)
    expr = expr.replace(lambda e: isinstance(e, sp.Add), _erfc_of_minus)
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), _guard_branches)


def log_sum_exp_terms(expr: sp.Expr) -> tuple[sp.Expr, tuple] | None:
    """``(u, limits)`` when ``expr`` is ``log(Sum(exp(u), *limits))``, else None."""
    if not (isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum)):
        return None
    total = expr.args[0]
    if not isinstance(total.function, sp.exp):
        return None
    return total.function.args[0], total.limits


def softmax_form(node: sp.exp, element: sp.Indexed, stage) -> sp.Expr:
    """``exp(v - lse[I])`` (``node``; ``element`` is ``lse[I]``, ``stage`` its definition
    ``lse[J] = log(Sum_k exp(u))``) as ``exp(v - m)/Sum_k exp(u - m)`` with ``m = max_k u``
    (at ``J = I``): the same value, which the printed code computes to full precision.

    ``exp(v - lse)`` computed from a rounded ``lse`` loses the digits that rounding dropped
    (softmax cross-entropy's input gradient at logits of 1e12: relative error 1.6e-5 in
    float64; at 1e16 a row with two tied maxima got 1/3 instead of 1/6); the shifted
    exponentials are 1 at the maximum, and their sum lies between 1 and the number of terms.
    """
    u, limits = log_sum_exp_terms(stage.expr)
    at = dict(zip(stage.indices, element.indices, strict=True))
    at.update({v: sp.Dummy(v.name, integer=True) for v, *_ in limits})  # the sum's own, apart
    u = u.xreplace(at)
    limits = [(at[v], low.xreplace(at), high.xreplace(at)) for v, low, high in limits]
    peak = WindowMax(u, *limits)
    return sp.exp(node.args[0] + element - peak) / sp.Sum(sp.exp(u - peak), *limits)


def softmax_of_stages(expr: sp.Expr, stages) -> sp.Expr:
    """Every ``exp(v - lse[I])`` in ``expr``, ``lse`` one of ``stages`` defined as a
    log-sum-exp, in :func:`softmax_form` (a softmax layer's output ``exp(x[n, j] - lse[n])``:
    the shifted exponentials over their sum, not the exponential of a difference of rounded
    values, which loses the digits of ``|x|``: relative error 5e-14 at inputs of 1000)."""
    sums = {s.array.base: s for s in stages if log_sum_exp_terms(s.expr) is not None}
    if not sums:
        return expr

    def rewrite(node: sp.exp) -> sp.Expr:
        elements = [e for e in node.atoms(sp.Indexed) if e.base in sums]
        if len(elements) != 1 or sp.diff(node.args[0], elements[0]) != -1:
            return node
        return softmax_form(node, elements[0], sums[elements[0].base])

    return expr.replace(lambda e: isinstance(e, sp.exp), rewrite)


def _erfc_of_minus(total: sp.Add) -> sp.Expr:
    """``2 - erfc(u)`` (sympy's form of ``erfc(-u)``) as ``erfc(-u)``, computed directly."""
    terms = list(total.args)
    if sp.Integer(2) not in terms:
        return total
    for term in terms:
        if term.could_extract_minus_sign() and isinstance(-term, sp.erfc):
            rest = [t for t in terms if t is not term]
            rest.remove(sp.Integer(2))
            return sp.Add(*rest, Erfc(-(-term).args[0]))
    return total


_GROWING = (sp.exp, sp.sinh, sp.cosh)


def _guard_branches(piecewise: sp.Piecewise) -> sp.Piecewise:
    """Keep a branch's ``exp`` from overflowing where an earlier branch is taken.

    ``np.where`` computes every branch everywhere: ELU's ``alpha*(exp(x) - 1)`` overflowed at
    ``x = 1000``, where ``x > 0`` takes the other branch. A branch taken only where ``u <= c``
    may read ``min(u, c)`` instead of ``u`` inside ``exp`` (and ``sinh``, ``cosh``): the same
    values where it is taken, no overflow where it is not.
    """
    pairs, bounds = [], {}
    for branch, condition in piecewise.args:
        if bounds:
            branch = branch.replace(
                lambda e: isinstance(e, _GROWING), lambda e: e.xreplace(bounds)
            )
        pairs.append((branch, condition))
        if isinstance(condition, sp.StrictGreaterThan | sp.GreaterThan):
            side, limit = condition.lhs, condition.rhs
        elif isinstance(condition, sp.StrictLessThan | sp.LessThan):
            side, limit = condition.rhs, condition.lhs
        else:
            continue
        if isinstance(side, sp.Indexed) and limit.is_number and side not in bounds:
            bounds[side] = sp.Min(side, limit)  # later branches: side <= limit
    return sp.Piecewise(*pairs, evaluate=False)


def _exp_argument(total: sp.Expr) -> sp.Expr:
    return next(a.args[0] for a in sp.Add.make_args(total) if isinstance(a, sp.exp))


def _is_log1p_exp(node) -> bool:
    if not isinstance(node, sp.log):
        return False
    terms = sp.Add.make_args(node.args[0])
    return len(terms) == 2 and 1 in terms and any(isinstance(t, sp.exp) for t in terms)


def _sigmoid_form(expr: sp.Expr) -> sp.Expr:
    """Write rational functions of ``exp(u)`` as polynomials in ``sigmoid(u)`` where possible."""
    arguments = []
    for node in expr.atoms(sp.exp):
        if any(isinstance(s, sp.Sum) for s in (expr,)) and node.has(sp.Sum):
            continue
        argument = node.args[0]
        if argument.could_extract_minus_sign():
            argument = -argument
        if argument not in arguments:
            arguments.append(argument)
    for argument in sorted(arguments, key=sp.default_sort_key):
        if argument.is_number:  # a constant: nothing overflows
            continue
        s = sp.Dummy("s")
        candidate = expr.xreplace({sp.exp(argument): s / (1 - s), sp.exp(-argument): (1 - s) / s})
        candidate = sp.factor_terms(sp.cancel(sp.together(candidate)))
        if candidate.has(sp.exp(argument)) or not _polynomial_in(candidate, s):
            continue
        expr = candidate.xreplace({s: Sigmoid(argument)})
    return expr


def _polynomial_in(expr: sp.Expr, s: sp.Symbol) -> bool:
    """Whether ``expr`` is a polynomial in ``s`` whose coefficients do not contain it: ``s``
    inside ``max``, ``abs`` or a function (``max(2, s/(1 - s))``) would compute ``exp(u)`` as
    ``s/(1 - s)``, which is ``1/0`` once ``s`` rounds to 1."""
    try:
        sp.Poly(expr, s)
    except sp.PolynomialError:
        return False
    return True
