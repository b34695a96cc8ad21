"""How a layer function computes the values its forward pass keeps in a cheaper form (see
*What backward keeps* in ``docs/architecture.md``): a kept step as a bool array, a kept arg-max
from the maxima the forward computes anyway."""

from __future__ import annotations

import sympy as sp

from ..derivation.arrays import Step, WindowArgmaxIndex, WindowMaximum
from ..derivation.derivation import Carried


class Positive(sp.Function):
    """``(u > 0)``, a NumPy bool array: a step kept by the forward pass, one byte an element,
    which the backward multiplies by (``np.multiply(dy, y_positive)``: the numbers of
    ``np.heaviside(u, 0)``)."""

    nargs = 1

    def _numpycode(self, printer) -> str:  # how NumPy printers print it (as Reshape)
        return f"({printer._print(self.args[0])} > 0)"


def _kept_type(carried: Carried, lowered: sp.Expr) -> sp.Expr:
    """A kept step as a bool array, ``(y > 0)``, not in the float type (one byte an element)."""
    if carried.dtype == "bool" and isinstance(lowered, Step):
        return Positive(lowered.args[0])
    return lowered


def _argmax_from_maxima(outputs: list[tuple[str, sp.Expr]]) -> list[tuple[str, sp.Expr]]:
    """A kept arg-max reads the maxima of the same windows where the forward computes them
    (max pooling's output): ``_first_argmax(x_windows, y)``, one pass over the windows fewer."""
    maxima = {v.args: sp.Symbol(t, real=True) for t, v in outputs
              if isinstance(v, WindowMaximum)}
    return [
        (t, WindowArgmaxIndex(*v.args, maxima[v.args]))
        if isinstance(v, WindowArgmaxIndex) and v.args in maxima else (t, v)
        for t, v in outputs
    ]
