"""Names for the values a generated function computes once and reads twice.

Common sub-expressions (sympy ``cse``) are named after what they compute, read off the
expression's structure: a sum over ``dy`` is ``sum_dy``, the sum of ``dy*xhat`` ``sum_dy_xhat``,
a row's maximum ``max_z``, ``exp(z - max_z)`` ``exp_z``, ``x - mu`` ``x_minus_mu``, ``x > 0``
``x_positive``, ``1/(N*H_in*W_in)`` ``inv_count``. A value whose description would be long or
that has no description gets the generic ``tmp``. Names are valid identifiers, unique within
the function (``_2``, ``_3``, ... on a clash) and depend on the expressions alone, so the same
network always gives the same names.
"""

from __future__ import annotations

import builtins
import dataclasses
import keyword
import re

import sympy as sp

from ..derivation.arrays import (
    Dot,
    Einsum,
    MaxOver,
    NewAxis,
    Permute,
    Sigmoid,
    Softplus,
    Step,
    SumOver,
    TensorDot,
)
from ..derivation.groups import GroupRepeat, GroupSum

#: Longest description used as a name; a longer one falls back to :data:`GENERIC`.
MAX_NAME = 24
GENERIC = "tmp"


def _is_size(symbol: sp.Basic) -> bool:
    return isinstance(symbol, sp.Symbol) and bool(symbol.is_integer and symbol.is_positive)


def describe(expr: sp.Expr) -> str | None:
    """Words for what ``expr`` computes, joined by ``_``, or ``None`` when nothing fits."""
    if isinstance(expr, sp.Symbol):
        return expr.name
    if isinstance(expr, NewAxis | Permute):  # a view: the same values
        return describe(expr.args[0])
    if isinstance(expr, SumOver | MaxOver):
        inner = describe(expr.args[0])
        return inner and ("sum_" if isinstance(expr, SumOver) else "max_") + inner
    if isinstance(expr, GroupRepeat):  # a group's value at each of its channels
        return describe(expr.args[0])
    if isinstance(expr, GroupSum):
        inner = describe(expr.args[0])
        return inner and "group_sum_" + inner
    if isinstance(expr, Einsum):  # a sum of a product: sum_dy_xhat
        operands = [describe(o) for o in expr.args[1:]]
        return None if None in operands else "sum_" + "_".join(operands)
    if isinstance(expr, Dot | TensorDot):
        a, b = (describe(o) for o in expr.args[:2])
        return a and b and f"{a}_dot_{b}"
    if isinstance(expr, sp.Mul):
        return _product(expr)
    if isinstance(expr, sp.Add):
        return _total(expr)
    if isinstance(expr, sp.Pow):
        base = describe(expr.base)
        if base is None:
            return None
        if expr.exp == -1:
            return f"inv_{base}"
        if expr.exp == 2:
            return f"{base}_squared"
        if expr.exp == sp.Rational(1, 2):
            return f"sqrt_{base}"
        if expr.exp == sp.Rational(-1, 2):
            return f"inv_sqrt_{base}"
        return None
    if isinstance(expr, sp.StrictGreaterThan | sp.GreaterThan) and expr.rhs == 0:
        lhs = describe(expr.lhs)
        return lhs and f"{lhs}_positive"
    if isinstance(expr, Step) and len(expr.args) == 1:
        inner = describe(expr.args[0])
        return inner and f"{inner}_positive"
    if isinstance(expr, sp.Function) and len(expr.args) == 1:
        inner = describe(expr.args[0])
        name = {Sigmoid: "sigmoid", Softplus: "softplus"}.get(type(expr), type(expr).__name__)
        return inner and name.isidentifier() and f"{name.lower()}_{inner}" or None
    return None


def _product(expr: sp.Mul) -> str | None:
    coefficient, rest = expr.as_coeff_Mul()
    factors = sp.Mul.make_args(rest)
    if all(_is_size(f) for f in factors):
        return "count"  # a product of sizes: how many values a sum runs over
    if coefficient == 1 and all(
        isinstance(f, sp.Pow) and f.exp == -1 and _is_size(f.base) for f in factors
    ):
        return "inv_count"
    words = [describe(f) for f in factors]
    if None in words:
        return None
    text = "_".join(words)
    if coefficient == -1:
        return f"neg_{text}"
    return text if coefficient == 1 else f"{text}_scaled"


def _total(expr: sp.Add) -> str | None:
    terms = list(expr.as_ordered_terms())
    if len(terms) != 2:
        return None
    signed = [_signed(t) for t in terms]
    if any(words is None for _, words in signed):
        return None
    (minus_a, a), (negated, b) = sorted(signed)
    if minus_a:
        return None
    if negated and b == f"max_{a}":
        return a  # shifted by its own maximum (to keep exp finite): still read as ``a``
    return f"{a}_{'minus' if negated else 'plus'}_{b}"


def _signed(term: sp.Expr) -> tuple[bool, str | None]:
    """(whether ``term`` is subtracted, words for its magnitude)."""
    if term.could_extract_minus_sign():
        return True, describe(-term)
    words = describe(term)
    if words is not None and words.startswith("neg_"):  # (-mu)[:, None, None]
        return True, words[len("neg_"):]
    return False, words


def value_name(expr: sp.Expr, taken: set[str]) -> str:
    """A fresh identifier for ``expr`` (not in ``taken``, which it is added to)."""
    name = describe(expr)
    if name is None or len(name) > MAX_NAME or not name.isidentifier():
        name = GENERIC
    base, count = name, 1
    while name in taken or keyword.iskeyword(name) or hasattr(builtins, name):
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name


def _renamed(statement, names: dict[str, str]):
    """``statement`` with the placeholders ``common<i>`` replaced by their ``names``."""
    if not names:
        return statement

    def rename(text: str) -> str:
        return re.sub(r"\bcommon\d+\b", lambda m: names.get(m.group(0), m.group(0)), text)

    call = statement.call
    if call is not None:
        call = (call[0], [rename(a) for a in call[1]])
    return dataclasses.replace(
        statement,
        target=rename(statement.target),
        code=rename(statement.code),
        extra=[rename(line) for line in statement.extra],
        call=call,
    )
