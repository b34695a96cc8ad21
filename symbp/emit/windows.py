"""Names for the big intermediates of convolution and pooling (window views, scatters).

Before printing, each window view (``x_windows``), zero-padded gradient (``dy_padded``) and
scattered matrix (``cols``) is named once, and the matrix product of windows and the scatter of
a matrix product each become one node (``_window_tensordot``, ``_col2im_tensordot``) whose
helper chooses how to compute it for the shapes it gets.
"""

from __future__ import annotations

import sympy as sp

from ..derivation.arrays import (
    ArgmaxMask,
    ArrayOp,
    Col2Im,
    FirstArgmaxMask,
    Shifted,
    TensorDot,
    Windows,
)


# -- the nodes printed for the generated module's helpers (emission only) ----------------------
class WindowTensorDot(ArrayOp):
    """``(a, x, kernel, stride, dilation, axes_a, axes_windows, order)``: the product
    ``TensorDot(a, Windows(x, kernel, stride, dilation), axes_a, axes_windows, order)``, as one
    node for the generated module's ``_window_tensordot``, which computes it by im2col or by a
    banded matrix, whichever costs less for the shapes it gets (emission only)."""


class Col2ImTensorDot(ArrayOp):
    """``(a, b, axes_a, axes_b, order, kernel, stride, dilation)``: the scatter
    ``Col2Im(TensorDot(a, b, axes_a, axes_b, order), kernel, stride, dilation)``, as one node for
    the generated module's ``_col2im_tensordot`` (im2col columns or banded rows; emission only)."""


class ArgmaxCol2Im(ArrayOp):
    """``(a, g, kernel, stride, dilation)``: ``Col2Im(ArgmaxMask(a) * g, ...)``, each window's
    ``g`` routed to its kept arg-max, for ``_argmax_col2im`` (emission only)."""


class FirstMaxCol2Im(ArrayOp):
    """``(windows, g, kernel, stride, dilation)``: the scatter
    ``Col2Im(FirstArgmaxMask(windows) * g, kernel, stride, dilation)`` (max pooling's gradient:
    each window's ``g`` routed to where its first maximum was read), as one node for the
    generated module's ``_first_max_col2im``, which makes neither the mask nor the product an
    array of its own (emission only)."""


def _name_windows(exprs: list[sp.Expr]) -> tuple[list[tuple[str, sp.Expr]], list[sp.Expr]]:
    """Name each window view (``x_windows``) and each scattered array (``cols``).

    They are the big intermediates of convolutions and pooling; named, each is computed once and
    the lines that use them stay short enough to read. A matrix product of windows, and the
    scatter of a matrix product, become one node each (``_window_tensordot``,
    ``_col2im_tensordot``): their helpers choose how to compute them for the shapes they get.
    """
    named: dict[sp.Expr, sp.Symbol] = {}

    def name(node: sp.Expr, base: str) -> sp.Symbol:
        if node not in named:
            taken = {str(symbol) for symbol in named.values()}
            text, number = base, 1
            while text in taken:
                number += 1
                text = f"{base}{number}"
            named[node] = sp.Symbol(text, real=True)
        return named[node]

    def padded(array: sp.Expr) -> sp.Expr:
        if isinstance(array, Shifted) and array.args[0].is_Symbol:  # a zero-padded gradient
            return name(array, f"{array.args[0]}_padded")
        return array

    def visit(expr: sp.Expr) -> sp.Expr:
        if not isinstance(expr, sp.Basic) or not expr.has(Windows, Col2Im):
            return expr
        if isinstance(expr, TensorDot) and isinstance(expr.args[1], Windows):
            a, windows, axes_a, axes_windows, order = expr.args
            array, *geometry = windows.args
            return WindowTensorDot(visit(a), padded(visit(array)), *geometry, axes_a,
                                   axes_windows, order)
        if (isinstance(expr, Col2Im) and isinstance(expr.args[0], TensorDot)
                and not expr.args[0].has(Windows)):
            product, *geometry = expr.args
            a, b, *axes = product.args
            return Col2ImTensorDot(visit(a), visit(b), *axes, *geometry)
        routed = _first_max_routing(expr, FirstArgmaxMask)
        if routed is not None:
            windows, g = routed
            return FirstMaxCol2Im(visit(windows.args[0]), visit(g), *expr.args[1:])
        routed = _first_max_routing(expr, ArgmaxMask)
        if routed is not None:
            mask, g = routed
            return ArgmaxCol2Im(visit(mask.args[0]), visit(g), *expr.args[1:])
        expr = expr.func(*[visit(arg) for arg in expr.args])
        if isinstance(expr, Windows):
            expr = expr.func(padded(expr.args[0]), *expr.args[1:])
        if isinstance(expr, Windows) and expr.args[0].is_Symbol:
            return name(expr, f"{expr.args[0]}_windows")
        if isinstance(expr, Col2Im) and not expr.args[0].is_Symbol:
            return expr.func(name(expr.args[0], "cols"), *expr.args[1:])
        return expr

    exprs = [visit(e) for e in exprs]
    return [(str(symbol), node) for node, symbol in named.items()], exprs


def _first_max_routing(expr: sp.Expr, kind) -> tuple[sp.Expr, sp.Expr] | None:
    """``(mask, g)`` when ``expr`` is ``Col2Im(mask * g, ...)`` for a ``kind`` mask (a window's
    first maximum: ``FirstArgmaxMask(windows)``, or its kept position: ``ArgmaxMask(a, ...)``)."""
    if not isinstance(expr, Col2Im):
        return None
    factors = sp.Mul.make_args(expr.args[0])
    masks = [f for f in factors if isinstance(f, kind)]
    if len(masks) != 1 or len(factors) < 2:
        return None
    (mask,) = masks
    return mask, sp.Mul(*[f for f in factors if f is not mask])
