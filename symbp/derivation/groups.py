"""Group norm's group sums and reads in whole-array form.

A group of ``C/groups`` consecutive channels is written ``floor(k*groups/C)`` in index notation
(:class:`symbp.declare.canon.GroupNorm`). A sum over a group's channels (and every axis after
them) is ``a.reshape(N, groups, -1).sum(axis=2)``; a group's value read at a channel is
``np.repeat(a, C // groups, axis=1)``.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE

from ..errors import DerivationError
from .arrays import ArrayOp, Axes, Lowering, _is_index, align


class GroupSum(ArrayOp):
    """``(a, N, groups)``: each sample's sum over a group of consecutive channels and every
    axis after them, ``a.reshape(N, groups, -1).sum(axis=2)`` (group norm's statistics)."""

    nargs = 3

    def _numpycode(self, printer) -> str:  # how NumPy printers print it (as Reshape)
        array, batch, groups = self.args
        shape = f"{printer._print(batch)}, {printer._print(groups)}, -1"
        pair = _same_shape_pair(array, getattr(printer, "shapes", None))
        if pair is not None:  # the sum of a product, with no product array in memory
            views = ", ".join(f"{printer._print(a)}.reshape({shape})" for a in pair)
            return f'{printer._module_format("numpy.einsum")}("ijk,ijk->ij", {views})'
        text = printer.parenthesize(array, PRECEDENCE["Atom"], strict=True)
        return f"{text}.reshape({shape}).sum(axis=2)"

    def _latex(self, printer) -> str:
        array, _, groups = (printer._print(a) for a in self.args)
        return rf"\operatorname{{groupsum}}_{{{groups}}}\left({array}\right)"


def _same_shape_pair(array, shapes) -> tuple | None:
    """``(a, b)`` when ``array`` is ``a*b`` or ``a**2`` of two arrays of one known shape."""
    factors = list(sp.Mul.make_args(array))
    if len(factors) == 1 and factors[0].is_Pow and factors[0].exp == 2:
        factors = [factors[0].base] * 2
    if shapes is None or len(factors) != 2 or not all(isinstance(f, sp.Symbol) for f in factors):
        return None
    known = [shapes.get(f.name) for f in factors]
    return tuple(factors) if known[0] is not None and known[0] == known[1] else None


class GroupRepeat(ArrayOp):
    """``(a, channels per group)``: a value per group read at each of its channels,
    ``np.repeat(a, C // groups, axis=1)``."""

    nargs = 2

    def _numpycode(self, printer) -> str:
        array, times = self.args
        count = " // ".join(printer._print(part) for part in sp.fraction(times))
        return f"{printer._module_format('numpy.repeat')}({printer._print(array)}, {count}, axis=1)"

    def _latex(self, printer) -> str:
        array, times = (printer._print(a) for a in self.args)
        return rf"\operatorname{{repeat}}_{{{times}}}\left({array}\right)"


def lower_grouped(lowering: Lowering, expr: sp.Expr) -> tuple[sp.Expr, Axes] | None:
    """A group's sum or a group's value read at a channel, else None."""
    if isinstance(expr, sp.Indexed) and any(isinstance(i, sp.floor) for i in expr.indices):
        return lower_group_read(lowering.symbol(expr.base.name), expr)
    if isinstance(expr, sp.Sum) and any(
        isinstance(f, sp.KroneckerDelta) and f.has(sp.floor)
        for f in sp.Mul.make_args(expr.function)
    ):
        return lower_group_sum(lowering, expr)
    return None


def lower_group_read(array: sp.Expr, expr: sp.Indexed) -> tuple[sp.Expr, Axes]:
    """``a[n, floor(c*groups/C)]`` at ``(n, c)``."""
    n, group = expr.indices
    channels = [a for a in group.free_symbols if _is_index(a)]
    if not _is_index(n) or len(channels) != 1 or not isinstance(group, sp.floor):
        raise DerivationError(f"cannot lower the element {expr} to a whole array")
    rate = sp.simplify(group.args[0] / channels[0])
    return GroupRepeat(array, 1 / rate), (n, channels[0])


def lower_group_sum(lowering: Lowering, expr: sp.Sum) -> tuple[sp.Expr, Axes]:
    """``Sum_{k,h,w} delta(g, floor(k*G/C)) a[n, k, h, w]`` at ``(n, g)`` as the groups'
    sums; at ``(n, c)`` with ``delta(floor(c*G/C), floor(k*G/C))``, each read at its
    channels."""
    lowering._record(expr.limits)
    factors = sp.Mul.make_args(expr.function)
    (delta,) = [f for f in factors if isinstance(f, sp.KroneckerDelta)]
    rest = sp.Mul(*[f for f in factors if f is not delta])
    bound = [limit[0] for limit in expr.limits]
    inner = [side for side in delta.args if side.free_symbols & set(bound)]
    outer = [side for side in delta.args if not side.free_symbols & set(bound)]
    if len(inner) != 1 or len(outer) != 1 or not isinstance(inner[0], sp.floor):
        raise DerivationError(f"cannot lower {delta} as a group's sum")
    (channel,) = inner[0].free_symbols & set(bound)
    rate = sp.simplify(inner[0].args[0] / channel)  # groups / C
    array, have = lowering._lower(rest)
    free = [a for a in have if a not in bound]
    if len(free) != 1 or set(have) - set(free) != set(bound):
        raise DerivationError(f"cannot lower {expr} as a group's sum")
    rest_axes = [b for b in bound if b != channel]
    target = (free[0], channel, *[a for a in have if a in rest_axes])
    groups = sp.simplify(rate * lowering.sizes[channel])
    summed = GroupSum(align(array, have, target, full=True), lowering.sizes[free[0]], groups)
    (side,) = outer
    if isinstance(side, sp.Symbol):
        return summed, (free[0], side)
    if isinstance(side, sp.floor):
        (read,) = [a for a in side.free_symbols if _is_index(a)]
        return GroupRepeat(summed, 1 / rate), (free[0], read)
    raise DerivationError(f"cannot lower {delta} as a group's sum")
