"""The derivative at a kink is a convention; symbp's is PyTorch's.

sympy differentiates ``Max(0, x)`` to ``Heaviside(x)``, whose value at 0 is 1/2. Frameworks
(and the finite-difference checks that compare against them) use ReLU'(0) = 0, so every
``Heaviside(u)`` the engine produces becomes ``Heaviside(u, 0)``: 0 at the kink. ``Piecewise``
derivatives keep sympy's reading, which already matches: ``Piecewise((1, x > 0), (a, True))``
takes the second branch at 0 (leaky ReLU's slope), as PyTorch does; ``sign(0) = 0`` for ``abs``.
"""

from __future__ import annotations

import sympy as sp

#: The value a step takes at its kink.
STEP_AT_ZERO = sp.Integer(0)


def apply_kink_convention(expr: sp.Expr) -> sp.Expr:
    """Give every ``Heaviside`` the value :data:`STEP_AT_ZERO` at 0 (sympy's default: 1/2)."""
    return expr.replace(
        lambda e: isinstance(e, sp.Heaviside) and e.args[1:] != (STEP_AT_ZERO,),
        lambda e: sp.Heaviside(e.args[0], STEP_AT_ZERO),
    )
