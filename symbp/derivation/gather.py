"""Reads at integer ids (an embedding's) and their adjoint, in whole-array form.

A table read at ids, ``W[ids[n], j]``, is the rows ``np.take(W, ids, axis=0)``; the sum its
derivative leaves, ``Sum_m delta(v, ids[m]) dy[m, j]`` at ``(v, j)``, adds each row of ``dy``
onto the row of its id: ``_scatter_rows(dy, ids, V)``, whole-array NumPy (a stable sort of the
ids, ``np.add.reduceat`` over the repeated ones; see :mod:`symbp.runtime.gather`), never a loop
over the samples.
"""

from __future__ import annotations

import sympy as sp

from ..errors import DerivationError
from .arrays import ArrayOp, Axes, Lowering, _is_index, align


class TakeRows(ArrayOp):
    """``(table, ids)``: row ``ids[...]`` of ``table`` for each id, ``np.take(W, ids, axis=0)``
    (axes: the ids', then the table's after its first)."""

    nargs = 2

    def _numpycode(self, printer) -> str:  # how NumPy printers print it
        table, ids = (printer._print(a) for a in self.args)
        return f"{printer._module_format('numpy.take')}({table}, {ids}, axis=0)"

    def _latex(self, printer) -> str:
        table, ids = (printer._print(a) for a in self.args)
        return rf"{table}\left[{ids}\right]"


class ScatterRows(ArrayOp):
    """``(rows, ids, count)``: the ``(count, ...)`` array whose row ``v`` is the sum of the
    rows of ``rows`` whose id is ``v`` (the adjoint of :class:`TakeRows`)."""

    nargs = 3

    def _numpycode(self, printer) -> str:
        rows, ids, count = (printer._print(a) for a in self.args)
        return f"{printer._helper('scatter_rows')}({rows}, {ids}, {count})"

    def _latex(self, printer) -> str:
        rows, ids, count = (printer._print(a) for a in self.args)
        return rf"\operatorname{{scatter}}_{{{count}}}\left({rows}, {ids}\right)"


def _id_read(index: sp.Expr) -> bool:
    """``ids[n]``: an element of an integer array, read as an index."""
    return isinstance(index, sp.Indexed) and bool(index.base.is_integer)


def lower_gathered(lowering: Lowering, expr: sp.Expr) -> tuple[sp.Expr, Axes] | None:
    """A table read at ids, or the sum adding rows back at their ids; else None."""
    if isinstance(expr, sp.Indexed) and any(_id_read(i) for i in expr.indices):
        return _take(lowering, expr)
    if isinstance(expr, sp.Sum) and any(
        isinstance(f, sp.KroneckerDelta) and any(_id_read(side) for side in f.args)
        for f in sp.Mul.make_args(expr.function)
    ):
        return _scatter(lowering, expr)
    return None


def _take(lowering: Lowering, expr: sp.Indexed) -> tuple[sp.Expr, Axes]:
    """``W[ids[n, t], j]`` at ``(n, t, j)``."""
    read, *rest = expr.indices
    ids = tuple(read.indices) if _id_read(read) else ()
    if not ids or not all(_is_index(i) for i in (*ids, *rest)) or len(set(ids + tuple(rest))) \
            != len(ids) + len(rest):
        raise DerivationError(f"cannot lower the element {expr} to a whole array (ids read "
                              "the first axis, plain indices the others)")
    table = lowering.symbol(expr.base.name)
    return TakeRows(table, lowering.symbol(read.base.name)), (*ids, *rest)


def _scatter(lowering: Lowering, expr: sp.Sum) -> tuple[sp.Expr, Axes]:
    """``Sum_{m, t} delta(v, ids[m, t]) g[m, t, j]`` at ``(v, j)``."""
    lowering._record(expr.limits)
    factors = sp.Mul.make_args(expr.function)
    (delta,) = [f for f in factors if isinstance(f, sp.KroneckerDelta)]
    rest = sp.Mul(*[f for f in factors if f is not delta])
    (read,) = [side for side in delta.args if _id_read(side)]
    (row,) = [side for side in delta.args if side is not read]
    bound = tuple(limit[0] for limit in expr.limits)
    if tuple(read.indices) != bound or not _is_index(row):
        raise DerivationError(f"cannot lower {expr} as a scatter-add at ids")
    array, have = lowering._lower(rest)
    free = tuple(a for a in have if a not in bound)
    if len(free) != 1 or set(have) != set(bound) | set(free):
        raise DerivationError(f"cannot lower {expr} as a scatter-add at ids")
    rows = align(array, have, (*bound, *free), full=True)
    count = lowering.sizes[row]
    return ScatterRows(rows, lowering.symbol(read.base.name), count), (row, *free)
