"""Layers that read several values: the nodes that make a network a graph (``docs/graphs.md``).

``add`` and ``multiply`` (element-wise, inputs of one shape), ``concat`` (along the features,
the last axis), ``split`` (the features in consecutive parts ``name.0``, ``name.1``, ...: one
:class:`Slice` each) and ``matmul`` (per sample, ``(A, B) @ (B, C)``). Each declares its forward
pass in index notation; the backward pass is derived like any layer's. A layer reading several
values gets the tuple of their per-sample shapes as ``in_shape``.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import Layer, _integer, register, shown
from .forms import Array, Forward, N, Stage, index, size

#: per-sample sizes of features, sequences (T, D) and images, and their index letters
_DIMS = {1: (size("F"),), 2: (size("T"), size("F")), 3: (size("C"), size("H_in"), size("W_in"))}
_LETTERS = {N: "n", size("F"): "j", size("T"): "t", size("C"): "c", size("H_in"): "h",
            size("W_in"): "w"}


def _features(shapes, kind: str) -> None:
    for shape in shapes:
        if len(shape) not in (1, 2):
            raise SpecError(
                f"{kind} works along the features of vectors [F] or sequences [T, D], got "
                f"{list(shape)}",
                field="inputs",
            )
    if len({shape[:-1] for shape in shapes}) > 1 or len({len(s) for s in shapes}) > 1:
        raise SpecError(
            f"{kind} needs the same shape but for the features, got "
            + ", ".join(str(list(s)) for s in shapes),
            field="inputs",
        )


class _Elementwise2(Layer):
    """``y = a (op) b`` element by element, ``a`` and ``b`` of one shape."""

    arity = 2

    def output_shape(self, in_shape):
        self.check_inputs(in_shape)
        return in_shape[0]

    def _op(self, a, b):
        raise NotImplementedError

    def forward_form(self, in_shape):
        dims = (N, *_DIMS[len(in_shape[0])])
        idx = tuple(index(_LETTERS[d]) for d in dims)
        a, b = Array("a", dims), Array("b", dims)
        return Forward(
            inputs=(a, b),
            params=(),
            stages=(Stage(Array("y", dims), idx, self._op(a[idx], b[idx])),),
            keep=None,
            letters=_LETTERS,
            elementwise=True,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape[0]))


@register
class Addition(_Elementwise2):
    """``y = a + b``: two branches joined (a residual connection written as a graph)."""

    kind = "add"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def _op(self, a, b):
        return a + b


@register
class Multiplication(_Elementwise2):
    """``y = a * b`` element by element (a gate, a mask)."""

    kind = "multiply"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def _op(self, a, b):
        return a * b


@register
class Concat(Layer):
    """``y = [a, b, ...]`` along the features (the last axis)."""

    kind = "concat"
    arity = None  # two or more

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def check_inputs(self, shapes):
        _features(shapes, self.kind)

    def output_shape(self, in_shape):
        self.check_inputs(in_shape)
        return (*in_shape[0][:-1], sum(shape[-1] for shape in in_shape))

    def forward_form(self, in_shape):
        lead = _DIMS[len(in_shape[0])][:-1]
        widths = [size(f"F{k + 1}") for k in range(len(in_shape))]
        idx = tuple(index(_LETTERS[d]) for d in (N, *lead))
        j = index("j")
        arrays = [Array(f"x{k + 1}", (N, *lead, w)) for k, w in enumerate(widths)]
        # Outside an array's range an element is 0: each part is read at its offset.
        terms, offset = [], sp.Integer(0)
        for array, width in zip(arrays, widths, strict=True):
            terms.append(array[(*idx, j - offset)])
            offset += width
        letters = dict(_LETTERS)
        letters.update({w: f"i{k + 1}" for k, w in enumerate(widths)})
        return Forward(
            inputs=tuple(arrays),
            params=(),
            stages=(Stage(Array("y", (N, *lead, offset)), (*idx, j), sp.Add(*terms)),),
            keep=(),
            letters=letters,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape), len(in_shape[0]))

    def stem_for(self, in_shape):
        return f"concat{len(in_shape)}" if len(in_shape) > 2 else "concat"


@register
class Split(Layer):
    """The features (the last axis) in consecutive parts of ``sizes``: the values
    ``name.0``, ``name.1``, ... (a :class:`Slice` each), read by naming them in ``inputs``."""

    kind = "split"

    def __init__(self, sizes: list[int], *, name: str | None = None) -> None:
        super().__init__(name=name)
        if not isinstance(sizes, list | tuple) or len(sizes) < 2:
            raise SpecError(f"must be a list of at least two sizes, got {shown(sizes)}",
                            field="sizes")
        self.sizes = tuple(_integer(s, field="sizes") for s in sizes)

    def parts(self, in_shape) -> list[Layer]:
        """The layers computing each part: a slice of the features."""
        _features([in_shape], self.kind)
        if sum(self.sizes) != in_shape[-1]:
            raise SpecError(
                f"sizes {list(self.sizes)} add up to {sum(self.sizes)}, but the input has "
                f"{in_shape[-1]} features",
                field="sizes",
            )
        starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        return [Slice(start, width) for start, width in zip(starts, self.sizes, strict=True)]

    def output_shape(self, in_shape):
        raise SpecError("a split's parts are read by name (name.0, name.1, ...)")

    def forward_form(self, in_shape):
        raise SpecError("a split's parts are read by name (name.0, name.1, ...)")

    def describe(self):
        return f"split(sizes={list(self.sizes)})"


class Slice(Layer):
    """``y[..., j] = x[..., start + j]`` for ``j < width``: one part of a :class:`Split`."""

    kind = "split"  # a part of one
    START = size("start")

    def __init__(self, start: int, width: int) -> None:
        super().__init__()
        self.start, self.width = start, width

    def output_shape(self, in_shape):
        return (*in_shape[:-1], self.width)

    def constant_values(self):
        return {"start": self.start}

    def forward_form(self, in_shape):
        lead = _DIMS[len(in_shape)][:-1]
        idx = tuple(index(_LETTERS[d]) for d in (N, *lead))
        features, width = size("F"), size("W")
        x = Array("x", (N, *lead, features))
        j = index("j")
        at = j + self.START  # (a first part: start = 0)
        letters = {**_LETTERS, features: "i", width: "j"}
        return Forward(
            inputs=(x,),
            params=(),
            stages=(Stage(Array("y", (N, *lead, width)), (*idx, j), x[(*idx, at)]),),
            constants={self.START: self.START},
            keep=(),
            letters=letters,
        )

    def math_key(self, in_shape):
        return ("slice", len(in_shape))

    @property
    def function_stem(self):
        return "slice"

    def describe(self):
        return f"features [{self.start}:{self.start + self.width}]"


@register
class Matmul(Layer):
    """``y = a @ b`` per sample: ``a`` (A, B), ``b`` (B, C), ``y`` (A, C)."""

    kind = "matmul"
    arity = 2

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def check_inputs(self, shapes):
        a, b = shapes
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise SpecError(
                f"matmul multiplies (A, B) by (B, C) per sample, got {list(a)} and {list(b)}",
                field="inputs",
            )

    def output_shape(self, in_shape):
        self.check_inputs(in_shape)
        return (in_shape[0][0], in_shape[1][1])

    def forward_form(self, in_shape):
        A, B, C = size("A"), size("B"), size("C")
        # ("k" is the engine's own name for a bound index: the sizes' letters avoid it)
        n, i, r, j = index("n"), index("i"), index("r"), index("j")
        a, b = Array("a", (N, A, B)), Array("b", (N, B, C))
        y = sp.Sum(a[n, i, r] * b[n, r, j], (r, 0, B - 1))
        return Forward(
            inputs=(a, b),
            params=(),
            stages=(Stage(Array("y", (N, A, C)), (n, i, j), y),),
            keep=("a", "b"),
            letters={N: "n", A: "i", B: "r", C: "j"},
        )

    def math_key(self, in_shape):
        return (self.kind,)
