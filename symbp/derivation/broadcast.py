"""A result constant along some of its axes, made a whole array of its own shape.

Global average pooling's input gradient ``dx[n, c, h, w] = dy[n, c]/(H*W)`` does not depend on
``h`` and ``w``: its whole-array form is ``dy[:, :, None, None]/(H*W)``, of shape
``(N, C, 1, 1)``, which NumPy broadcasts but which is not the input's gradient array (the next
layer's backward writes into it). :func:`filled` wraps such a lowered result in
:class:`Broadcast`, printed as a new array of the full shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

from .arrays import ArrayOp


class Broadcast(ArrayOp):
    """``(a, dims)``: ``a`` repeated along its length-1 axes to the shape ``dims``, a new
    array (``np.broadcast_to(a, dims).copy()``)."""

    nargs = 2

    def _numpycode(self, printer) -> str:  # how NumPy printers print it
        array, dims = self.args
        shape = ", ".join(printer._print(d) for d in dims)
        function = printer._module_format("numpy.broadcast_to")
        return f"{function}({printer._print(array)}, ({shape})).copy()"


def filled(lowered: sp.Expr, expr: sp.Expr, indices: Sequence[sp.Symbol],
           dims: Sequence[sp.Expr]) -> sp.Expr:
    """``lowered`` (the whole-array form of ``expr`` at ``indices``), as an array of ``dims``
    where ``expr`` does not depend on every one of its indices."""
    if not indices or all(i in expr.free_symbols for i in indices):
        return lowered
    return Broadcast(lowered, sp.Tuple(*dims))


class Positions(ArrayOp):
    """``np.arange(size)``: an index read as a number (a causal mask's ``u <= t``), along
    the index's own axis."""

    def _numpycode(self, printer) -> str:
        return f"np.arange({printer._print(self.args[0])})"
