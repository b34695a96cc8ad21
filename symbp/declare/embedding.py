"""An embedding: integer ids in, rows of a learned table out (PyTorch's ``nn.Embedding``).

Declared, like every layer, by its forward pass alone, a gather in index notation::

    y[n, j] = W[ids[n], j]            one id per sample   (input = { ids = V })
    y[n, t, j] = W[ids[n, t], j]      a sequence of T ids (input = { ids = V, shape = [T] })

The engine derives the weight's gradient from it, ``dW[v, j] = sum_m [ids[m] = v] dy[m, j]``
(a scatter-add over the samples), and no input gradient: the ids are integers
(:attr:`~symbp.declare.forms.Array.integer`), not differentiated.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import LETTERS as BASE_LETTERS
from .base import F, Layer, _integer, register, shown
from .forms import Array, Forward, N, Stage, index, size

#: the table's rows (``num``) and the sequence's length
V, T = size("V"), size("T")
LETTERS = {**BASE_LETTERS, V: "v", T: "t"}


@register
class Embedding(Layer):
    """``y = W[ids]``: row ``ids[n]`` of the table ``W`` (``num`` x ``dim``) for each id.

    Its input is the network's integer ids (``input = { ids = V }``, ids in ``[0, V)``), so it
    is the first layer; ``num`` defaults to ``V`` and may be larger (rows no id reads get a
    zero gradient).
    """

    kind = "embedding"
    init = {"W": "normal"}  # N(0, 1), as nn.Embedding's
    takes_ids = True

    def __init__(self, dim: int, *, num: int | None = None, name: str | None = None):
        super().__init__(name=name)
        self.dim = _integer(dim, field="dim")
        self.num = None if num is None else _integer(num, field="num")
        self.vocabulary: int | None = None

    def bind_ids(self, vocabulary: int) -> None:
        """The network's ids run over ``[0, vocabulary)``: the table needs as many rows."""
        if self.num is not None and self.num < vocabulary:
            raise SpecError(
                f"the table has {self.num} rows but the input's ids run up to {vocabulary - 1} "
                f"(input ids = {vocabulary}); num must be at least {vocabulary}",
                field="num",
            )
        self.vocabulary = vocabulary

    @property
    def rows(self) -> int:
        if self.num is not None:
            return self.num
        if self.vocabulary is None:
            raise SpecError("an embedding reads the network's ids: declare input = { ids = V }",
                            field="input")
        return self.vocabulary

    def _ids(self, in_shape) -> tuple[sp.Symbol, ...]:
        if self.vocabulary is None:
            raise SpecError("an embedding reads the network's ids: declare input = { ids = V } "
                            "and make it the first layer", field="input")
        if len(in_shape) > 1:
            raise SpecError(f"expects one id or a sequence [T] of ids per sample, got "
                            f"{list(in_shape)}", field="input")
        return (N, T)[: len(in_shape) + 1]

    def output_shape(self, in_shape):
        self._ids(in_shape)
        return (*in_shape, self.dim)

    def param_shapes(self, in_shape):
        return {"W": (self.rows, self.dim)}

    def forward_form(self, in_shape):
        dims = self._ids(in_shape)
        idx = tuple(index(LETTERS[d]) for d in dims)
        j = index("j")
        ids, table = Array("ids", dims, integer=True), Array("W", (V, F))
        return Forward(
            inputs=(ids,),
            params=(table,),
            stages=(Stage(Array("y", (*dims, F)), (*idx, j), table[ids[idx], j]),),
            keep=(),
            letters=LETTERS,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))

    def describe(self):
        num = "" if self.num is None else f", num={self.num}"
        return f"embedding(dim={self.dim}{num})"


def check_ids_input(vocabulary, length) -> tuple[int, tuple[int, ...]]:
    """The vocabulary ``V`` and per-sample shape (``()`` or ``(T,)``) of an ids input."""
    if isinstance(vocabulary, bool) or not isinstance(vocabulary, int) or vocabulary < 1:
        raise SpecError(f"ids must be a positive integer (the number of ids V), got "
                        f"{shown(vocabulary)}", field="input")
    _integer(vocabulary, field="input")
    if length is None:
        return vocabulary, ()
    if (not isinstance(length, tuple | list) or len(length) != 1
            or isinstance(length[0], bool) or not isinstance(length[0], int) or length[0] < 1):
        raise SpecError(f"with ids, shape is [T] (the length of each sample's sequence of ids), "
                        f"got {shown(length)}", field="input")
    _integer(length[0], field="input")
    return vocabulary, (length[0],)

