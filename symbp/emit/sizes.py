"""The sizes a generated layer function uses: bound from its arrays' shapes or passed.

``N = x.shape[0]`` for each symbolic size an argument's shape tells (:func:`_size_bindings`);
the sizes none tells become keyword-only arguments (:func:`_with_sizes`).
"""

from __future__ import annotations

import sympy as sp

from ..declare.forms import Forward
from ..naming import adjoint
from .numpy_printer import numpy_code


def _array_shapes(form: Forward) -> dict[str, tuple | None]:
    """Shapes of the arrays a layer's formulas name: its arrays and their gradients."""
    shapes: dict[str, tuple | None] = {}
    for name, array in form.arrays.items():
        shapes[name] = tuple(array.dims)
        shapes[adjoint(name)] = tuple(array.dims)
    return shapes


def _size_bindings(exprs, form: Forward, available: list[str]) -> list[tuple[str, str]]:
    """``N = x.shape[0]`` for each symbolic size the expressions use."""
    bindings = []
    free = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
    arrays = {a.name: a for a in form.arrays.values()}
    arrays.update({adjoint(s.name): s.array for s in form.stages})
    unbound = []
    for symbol in sorted(free, key=lambda s: s.name):
        if not (symbol.is_integer and symbol.is_positive) or symbol in form.constants:
            continue
        binding = None
        for name in available:
            array = arrays.get(name)
            if array is None:
                continue
            if symbol in array.dims:
                binding = f"{name}.shape[{array.dims.index(symbol)}]"
                break
            # A padded length such as H_in + 2*padding: solve for H_in.
            for axis, dim in enumerate(array.dims):
                rest = sp.sympify(dim) - symbol
                if symbol not in rest.free_symbols and rest.free_symbols <= set(form.constants):
                    binding = numpy_code(sp.Symbol(f"{name}.shape[{axis}]") - rest)
                    break
            if binding:
                break
        if binding:
            bindings.append((symbol.name, binding))
        else:
            unbound.append(symbol.name)
    return bindings, unbound


def _with_sizes(keywords: str, sizes: list[str]) -> str:
    """Keyword-only arguments ``keywords`` plus sizes no argument's shape tells."""
    if not sizes:
        return keywords
    return keywords + (", " if keywords else ", *, ") + ", ".join(sizes)
