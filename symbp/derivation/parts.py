"""A plain read of an array over another range: a part of a concatenation.

A concatenation's forward reads its first part as ``x1[n, j]`` with ``j`` over the whole width
``F1 + F2 + ...`` (an element outside an array is 0), and its backward reads the upstream
gradient as ``dy[n, i1]`` with ``i1`` over ``F1`` only. Lowered, the first is ``x1`` zero-padded
to the width, the second ``dy``'s first ``F1`` columns: a :class:`~.arrays.Shifted` by 0.
"""

from __future__ import annotations

import sympy as sp


def _part_of(small, large) -> bool:
    """Whether the size ``small`` is one term of the sum of sizes ``large``."""
    return isinstance(large, sp.Add) and small in large.args


def part_read(lowering, name: str, indices) -> sp.Expr:
    """The array ``name`` read at the plain indices ``indices``: itself, or, where an index
    runs over a range of which the array's axis is a part (or the other way), the array
    zero-padded or cropped to that range."""
    from .arrays import Shifted

    array = lowering.symbol(name)
    dims = lowering.dims.get(name)
    if dims is None and name.startswith("d"):  # a gradient: its array's shape
        dims = lowering.dims.get(name[1:])
    if dims is None or len(dims) != len(indices):
        return array
    ranges = [lowering.sizes.get(index, dim) for index, dim in zip(indices, dims, strict=True)]
    differ = [k for k, (have, want) in enumerate(zip(dims, ranges, strict=True))
              if have != want and (_part_of(have, want) or _part_of(want, have))]
    if not differ:
        return array
    first = differ[0]
    return Shifted(array, sp.Tuple(*[sp.S.Zero] * (len(dims) - first)),
                   sp.Tuple(*ranges[first:]))
