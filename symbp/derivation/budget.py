"""Bounds on the work sympy is asked to do on one expression.

Simplification, factoring and solving expand integer powers: their time grows with the exponent
(``(min(x, 1) + max(x, 2))**5000``'s derivative kept ``simplify`` busy for minutes, and
``symbp flow``'s search for the supremum of |f'| longer). Every optional piece of symbolic
work (choosing a shorter form to print, seeking a bound in closed form) asks
:func:`too_costly` first and does without where it says so; nothing that the results' correctness
depends on is skipped.
"""

from __future__ import annotations

import sympy as sp

#: The largest integer exponent optional symbolic work is tried on.
MAX_POWER = 16


def too_costly(expr: sp.Expr) -> bool:
    """Whether ``expr`` raises something to an integer power beyond :data:`MAX_POWER`."""
    return any(
        power.exp.is_Integer and abs(power.exp) > MAX_POWER for power in expr.atoms(sp.Pow)
    )
