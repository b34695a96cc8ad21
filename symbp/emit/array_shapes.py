"""The shapes of whole-array expressions, as far as they can be told.

:func:`array_shape` follows the array operations of :mod:`symbp.derivation.arrays` and
:mod:`symbp.derivation.groups` and NumPy's broadcasting of element-wise nodes; the module
builder and :mod:`symbp.emit.memory_plan` use it to tell a small factor (a row vector) from a
full array (:func:`is_smaller`).
"""

from __future__ import annotations

import sympy as sp

from ..derivation.array_ops import is_array_op


def _broadcast(shapes: list[tuple]) -> tuple | None:
    rank = max((len(s) for s in shapes), default=0)
    result = []
    for position in range(rank):
        sizes = {s[position - rank + len(s)] for s in shapes if position - rank + len(s) >= 0}
        sizes.discard(sp.S.One)
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else sp.S.One)
    return tuple(result)


#: Array nodes whose value is computed element by element from their arguments.
_ELEMENTWISE = (sp.Add, sp.Mul, sp.Pow, sp.Function, sp.Rel, sp.Piecewise, sp.Max, sp.Min)


def array_shape(expr: sp.Expr, shapes: dict[str, tuple]) -> tuple | None:
    """The shape of a whole-array expression (sympy sizes, 1 for inserted axes), or None when
    it cannot be told. ``shapes`` gives the array symbols' shapes; other symbols are scalars."""
    from ..derivation.array_ops import Dot, Einsum, MaxOver, NewAxis, Permute, SumOver, TensorDot
    from ..derivation.groups import GroupRepeat, GroupSum

    if isinstance(expr, sp.Symbol):
        if expr.name not in shapes:
            return ()
        known = shapes[expr.name]
        return None if known is None else tuple(known)
    if expr.is_Number or isinstance(expr, sp.NumberSymbol) or expr in (sp.true, sp.false):
        return ()
    if isinstance(expr, SumOver | MaxOver):
        inner = array_shape(expr.args[0], shapes)
        dropped = {int(a) for a in expr.args[1]}
        return None if inner is None else tuple(
            d for k, d in enumerate(inner) if k not in dropped
        )
    if isinstance(expr, NewAxis):
        inner = array_shape(expr.args[0], shapes)
        if inner is None:
            return None
        positions = {int(p) for p in expr.args[1]}
        rest = iter(inner)
        head = [sp.S.One if p in positions else next(rest, None) for p in range(max(positions) + 1)]
        return None if None in head else (*head, *rest)
    if isinstance(expr, Permute):
        inner = array_shape(expr.args[0], shapes)
        if inner is None:
            return None
        if len(expr.args) == 1:
            return tuple(reversed(inner))
        return tuple(inner[int(p)] for p in expr.args[1])
    if isinstance(expr, Dot):
        a, b = (array_shape(arg, shapes) for arg in expr.args)
        if a is None or b is None or not a or not b:
            return None
        return (*a[:-1], *b[1:])
    if isinstance(expr, Einsum):
        spec, *operands = expr.args
        inputs, output = str(spec).split("->")
        sizes = {}
        for letters, operand in zip(inputs.split(","), operands, strict=True):
            shape = array_shape(operand, shapes)
            if shape is None or len(shape) != len(letters):
                return None
            sizes.update(zip(letters, shape, strict=True))
        return tuple(sizes[letter] for letter in output)
    if isinstance(expr, TensorDot):
        a, b, axes_a, axes_b, order = expr.args
        shape_a, shape_b = array_shape(a, shapes), array_shape(b, shapes)
        if shape_a is None or shape_b is None:
            return None
        free = [d for k, d in enumerate(shape_a) if k not in {int(i) for i in axes_a}]
        free += [d for k, d in enumerate(shape_b) if k not in {int(i) for i in axes_b}]
        return tuple(free[int(k)] for k in order)
    if isinstance(expr, GroupSum | GroupRepeat):  # (N, groups) and (N, C)
        inner = array_shape(expr.args[0], shapes)
        if isinstance(expr, GroupSum):
            return None if inner is None else (expr.args[1], expr.args[2])
        return None if inner is None or len(inner) != 2 else (inner[0], inner[1] * expr.args[1])
    if is_array_op(expr) and type(expr).__name__ not in (
        "Sigmoid",
        "Softplus",
        "Step",
    ):
        return None  # windows, einsum, scatters: not needed here
    if isinstance(expr, _ELEMENTWISE):
        parts = [array_shape(arg, shapes) for arg in expr.args]
        return None if None in parts else _broadcast(parts)
    return None


def is_smaller(expr: sp.Expr, shape: tuple, shapes: dict[str, tuple]) -> bool:
    """Whether ``expr`` has fewer elements than an array of ``shape`` (fewer non-1 sizes)."""
    own = array_shape(expr, shapes)
    if own is None:
        return False
    return sum(d != 1 for d in own) < sum(d != 1 for d in shape)
