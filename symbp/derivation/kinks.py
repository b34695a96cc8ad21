"""The derivative at a kink is a convention; symbp's are PyTorch's.

sympy differentiates ``Max(a, b)`` to ``Heaviside(a - b)*a' + Heaviside(b - a)*b'``, with
``Heaviside(0) = 1/2``. :func:`differentiate` (the engine's ``diff``) takes it from there:

* a tie of ``max``/``min`` with a constant takes the constant's side, derivative 0:
  ``max(x, 0)`` gives ReLU'(0) = 0, as PyTorch's ``relu`` (and ``relu6``, ``hardtanh`` at their
  bounds); every step whose other side is a constant becomes ``Heaviside(u, 0)``;
* a tie between two arguments that are not constants splits the gradient equally,
  ``(a' + b')/2``, as PyTorch's autograd does for ``torch.maximum``/``torch.minimum``:
  ``Heaviside(u, 1/2)``. It lies between the one-sided derivatives (``max(x, 0.3*x)`` at 0:
  0.65, in [0.3, 1]; ``max(x, x**2)`` at 1: 1.5, in [1, 2]); sympy's own ``Heaviside(0)`` on
  both terms gave the same, but :func:`apply_kink_convention` used to set every step to 0 at
  the kink, and the derivative was 0, outside both. ``max(a, b, c)`` is taken as
  ``max(a, max(b, c))``, so a three-way tie gets ``a'/2 + b'/4 + c'/4``, still a weighted mean
  of the tied derivatives (sympy's n-ary rule would weigh each by 1/2, a sum of 3/2).

``Piecewise`` derivatives keep sympy's reading, which already matches PyTorch:
``Piecewise((1, x > 0), (a, True))`` takes the second branch at 0 (leaky ReLU's slope);
``sign(0) = 0`` for ``abs``.
"""

from __future__ import annotations

import sympy as sp

#: The value a step takes at its kink (a tie with a constant: ReLU'(0) = 0).
STEP_AT_ZERO = sp.Integer(0)
#: A tie between two non-constant arguments of ``max``/``min``: each gets half the gradient.
TIE_SHARE = sp.Rational(1, 2)


class _Extremum(sp.Function):
    """``max``/``min`` of two arguments, kept apart from sympy's ``Max``/``Min`` while
    :func:`differentiate` runs, so that its derivative follows the conventions above."""

    nargs = 2
    is_real = True
    larger = True  # max; min for False

    def fdiff(self, argindex=1):
        mine, other = self.args if argindex == 1 else self.args[::-1]
        difference = mine - other if self.larger else other - mine
        if other.is_number:
            return sp.Heaviside(difference, STEP_AT_ZERO)
        return _Tie(difference)


class _Max(_Extremum):
    larger = True


class _Min(_Extremum):
    larger = False


class _Tie(sp.Function):
    """``Heaviside(u, 1/2)`` while :func:`differentiate` runs (apart from sympy's own
    ``Heaviside(u)``, whose 1/2 :func:`apply_kink_convention` turns into 0)."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex=1):  # pragma: no cover - derivatives are taken once
        raise NotImplementedError("a derivative of a tie step")


def _binary(expr: sp.Expr) -> sp.Expr:
    """Every ``Max``/``Min`` as nested two-argument :class:`_Max`/:class:`_Min`:
    ``max(a, b, c)`` as ``max(a, max(b, c))``."""

    def nest(node):
        kind = _Max if isinstance(node, sp.Max) else _Min
        first, *rest = sorted(node.args, key=sp.default_sort_key)
        inner = rest[-1]
        for arg in reversed(rest[:-1]):
            inner = kind(arg, inner)
        return kind(first, inner)

    return expr.replace(lambda e: isinstance(e, sp.Max | sp.Min), nest)


def _plain(expr: sp.Expr) -> sp.Expr:
    expr = expr.replace(lambda e: isinstance(e, _Tie), lambda e: sp.Heaviside(e.args[0], TIE_SHARE))
    expr = expr.replace(lambda e: isinstance(e, _Max), lambda e: sp.Max(*e.args))
    return expr.replace(lambda e: isinstance(e, _Min), lambda e: sp.Min(*e.args))


def differentiate(expr: sp.Expr, variable: sp.Expr) -> sp.Expr:
    """``d expr / d variable`` with the kink conventions of this module."""
    derivative = sp.diff(_binary(expr), variable)
    return _plain(apply_kink_convention(derivative))


def apply_kink_convention(expr: sp.Expr) -> sp.Expr:
    """Give every ``Heaviside`` the value :data:`STEP_AT_ZERO` at 0 (sympy's default: 1/2).

    For steps sympy made; :func:`differentiate` applies it before it writes its ties."""
    return expr.replace(
        lambda e: isinstance(e, sp.Heaviside) and e.args[1:] != (STEP_AT_ZERO,),
        lambda e: sp.Heaviside(e.args[0], STEP_AT_ZERO),
    )
