"""Recognising a reshape in a derivation: the same numbers in a new shape, in C order.

A layer that only moves numbers (flatten) declares its forward in index form like any other,
``y[n, k] = sum_{c, h, w} delta(k, c*H*W + h*W + w) x[n, c, h, w]``, and the engine derives
its backward, ``dx[n, c, h, w] = dy[n, c*H*W + h*W + w]``. :func:`is_reshape` reads that pair
back as a C-order reshape of the batch's rows, which a target may print as one
(``h.reshape(len(h), 256)``) instead of a function call.
"""

from __future__ import annotations

import sympy as sp

from ..declare.forms import Array
from .arrays import c_order_position
from .layer import LayerDerivation


def reads_as_reshape(expr: sp.Expr, source: Array, indices, dims) -> bool:
    """Whether ``expr`` (the element at ``indices`` of an array of ``dims``) is
    ``source[n, position]`` of the same batch row and the same C-order flat position."""
    if not isinstance(expr, sp.Indexed) or expr.base != source.base or len(expr.indices) != 2:
        return False
    batch, position = expr.indices
    want = c_order_position(indices[1:], dims[1:])
    return batch == indices[0] and sp.expand(position - want) == 0


_KNOWN: dict[int, tuple[LayerDerivation, bool]] = {}


def is_reshape(derivation: LayerDerivation) -> bool:
    """:func:`_is_reshape`, once per derivation (derivations are shared per layer math)."""
    known = _KNOWN.get(id(derivation))
    if known is None or known[0] is not derivation:
        known = _KNOWN[id(derivation)] = (derivation, _is_reshape(derivation))
    return known[1]


def _is_reshape(derivation: LayerDerivation) -> bool:
    """Whether the layer maps its one input to its output by a C-order reshape: its derived
    VJP reads the upstream gradient at the flat position of each input entry, and its forward
    is linear (zero at zero), so the VJP determines it."""
    form = derivation.form
    if form.params or form.aux or len(form.inputs) != 1 or len(form.stages) != 1:
        return False
    source = form.inputs[0]
    adjoint = derivation.vjp[source.name]
    upstream = Array("d" + form.output.name, form.output.array.dims)
    if not reads_as_reshape(adjoint.expr, upstream, adjoint.indices, source.dims):
        return False
    at_zero = form.output.expr.replace(
        lambda e: isinstance(e, sp.Indexed) and e.base == source.base, lambda e: sp.Integer(0)
    )
    return sp.simplify(at_zero.doit()) == 0
