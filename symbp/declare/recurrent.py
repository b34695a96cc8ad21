"""Recurrent cells: one time step of ``rnn`` (tanh, PyTorch's ``nn.RNN``), declared once.

The cell is declared as index-notation stages like any layer; its vector-Jacobian products
(``dh`` of the previous state, ``dx`` of the step's input, the weights' contributions) are
derived by :mod:`symbp.derivation`, nothing here is differentiated by hand. Backpropagation
through time is the derived cell run backwards over the steps with the weights' gradients summed
(:mod:`symbp.emit.recurrent`).
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import LETTERS, SEQ_DIMS, Cell, Layer, _integer, register
from .forms import Array, Forward, N, Stage, index, size

D, HIDDEN = size("D"), size("H")
CELL_LETTERS = {**LETTERS, D: "d", HIDDEN: "j"}


class RNNCell(Layer):
    """One step of a tanh RNN (``nn.RNNCell(D, hidden)``)::

        a[n, j]     = sum_d x[n, d] W_ih[j, d] + b_ih[j] + sum_i h[n, i] W_hh[j, i] + b_hh[j]
        h_new[n, j] = tanh(a[n, j])

    ``x`` is the step's input ``(N, D)``, ``h`` the previous state ``(N, H)``; ``W_ih``
    ``(H, D)``, ``W_hh`` ``(H, H)``, ``b_ih``, ``b_hh`` ``(H,)`` are PyTorch's
    ``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``.
    """

    kind = "rnn_cell"
    arity = 2
    init = {"W_ih": "fan", "W_hh": "fan", "b_ih": "zeros", "b_hh": "zeros"}

    def __init__(self, hidden: int, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.hidden = _integer(hidden, field="hidden")

    def output_shape(self, in_shape):
        return (self.hidden,)

    def param_shapes(self, in_shape):
        h, d = self.hidden, in_shape[-1]
        return {"W_ih": (h, d), "W_hh": (h, h), "b_ih": (h,), "b_hh": (h,)}

    def forward_form(self, in_shape=None):
        n, d, j, i = (index(s) for s in "ndji")
        x, h = Array("x", (N, D)), Array("h", (N, HIDDEN))
        W_ih, W_hh = Array("W_ih", (HIDDEN, D)), Array("W_hh", (HIDDEN, HIDDEN))
        b_ih, b_hh = Array("b_ih", (HIDDEN,)), Array("b_hh", (HIDDEN,))
        a = Array("a", (N, HIDDEN))
        stages = (
            Stage(a, (n, j), sp.Sum(x[n, d] * W_ih[j, d], (d, 0, D - 1)) + b_ih[j]
                  + sp.Sum(h[n, i] * W_hh[j, i], (i, 0, HIDDEN - 1)) + b_hh[j]),
            Stage(Array("h_new", (N, HIDDEN)), (n, j), sp.tanh(a[n, j])),
        )
        return Forward(inputs=(x, h), params=(W_ih, W_hh, b_ih, b_hh), stages=stages,
                       letters=CELL_LETTERS, through=("a",), keep=("x", "h", "h_new"))

    def math_key(self, in_shape):
        return (self.kind,)

    def describe(self):
        return f"rnn(hidden={self.hidden})"


class _Unrolled(Layer):
    """A layer running a :class:`~symbp.declare.base.Cell` over the steps of its sequences
    ``(T, D)`` with shared weights (declared by :meth:`unrolled_cell`), ``hidden = H``; its
    output is the last state ``(H,)``, or every state ``(T, H)`` with ``sequence = true``."""

    #: the blocks of rows (gates) stacked in each of PyTorch's parameters
    stacked: int = 1

    def __init__(self, hidden: int, *, sequence: bool = False, name: str | None = None) -> None:
        super().__init__(name=name)
        self.hidden = _integer(hidden, field="hidden")
        if not isinstance(sequence, bool):
            raise SpecError(f"must be true or false, got {sequence!r}", field="sequence")
        self.sequence = sequence

    def output_shape(self, in_shape):
        return (in_shape[0], self.hidden) if self.sequence else (self.hidden,)

    def _shapes(self, h, d):
        """PyTorch's parameters, each weight's rows :attr:`stacked` blocks of ``h``."""
        rows = self.stacked * h
        return {"W_ih": (rows, d), "W_hh": (rows, h), "b_ih": (rows,), "b_hh": (rows,)}

    def param_shapes(self, in_shape):
        if len(in_shape) != 2:
            raise SpecError(f"{self.kind} expects sequences (T, D), got per-sample shape "
                            f"{list(in_shape)}")
        return self._shapes(self.hidden, in_shape[-1])

    def forward_form(self, in_shape=None):
        """The layer as the network sees it: ``x`` ``(N, T, D)`` in, the states out, the layer's
        parameters; its stage names the cell it runs (the derivation is the cell's, over t)."""
        x = Array("x", (N, *SEQ_DIMS))
        dims = (N, SEQ_DIMS[0], HIDDEN) if self.sequence else (N, HIDDEN)
        n, t, j = index("n"), index("t"), index("j")
        out = Array("h_out", dims)
        indices = (n, t, j) if self.sequence else (n, j)
        step = sp.Function(f"{self.kind}_cell")(*indices)
        params = tuple(Array(name, dims) for name, dims in self._shapes(HIDDEN, D).items())
        return Forward(inputs=(x,), params=params, stages=(Stage(out, indices, step),),
                       letters={**CELL_LETTERS, SEQ_DIMS[0]: "t"})

    def math_key(self, in_shape):
        return (self.kind, self.sequence)

    def describe(self):
        return f"{self.kind}(hidden={self.hidden}{', sequence' if self.sequence else ''})"


@register
class RNN(_Unrolled):
    """``nn.RNN(D, hidden, batch_first=True)`` (tanh, one layer, ``h_0 = 0``): :class:`RNNCell`
    unrolled over the steps."""

    kind = "rnn"
    init = RNNCell.init

    def unrolled_cell(self, in_shape):
        return Cell((RNNCell(self.hidden),), ("h",))


def _sigmoid(z: sp.Expr) -> sp.Expr:
    return 1 / (1 + sp.exp(-z))


#: PyTorch's gate order in ``weight_ih_l0`` (4H, D), ``weight_hh_l0`` (4H, H) and the biases
GATES = "ifgo"


class _LSTMPart(Layer):
    """A part of one LSTM step (see :class:`LSTMState`, :class:`LSTMOutput`); ``gates`` are the
    gates it computes, each ``z[n, j] = sum_d x[n, d] W_i<g>[j, d] + b_i<g>[j]
    + sum_i h[n, i] W_h<g>[j, i] + b_h<g>[j]``, the rows of PyTorch's stacked weights."""

    gates: str = ""
    arity = 3

    def __init__(self, hidden: int, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.hidden = _integer(hidden, field="hidden")

    def output_shape(self, in_shape):
        return (self.hidden,)

    def gate_forms(self):
        n, d, j, i = (index(s) for s in "ndji")
        x, h = Array("x", (N, D)), Array("h", (N, HIDDEN))
        params, stages = [], []
        for gate in self.gates:
            W_i, W_h = Array(f"W_i{gate}", (HIDDEN, D)), Array(f"W_h{gate}", (HIDDEN, HIDDEN))
            b_i, b_h = Array(f"b_i{gate}", (HIDDEN,)), Array(f"b_h{gate}", (HIDDEN,))
            params += [W_i, W_h, b_i, b_h]
            stages.append(Stage(Array(f"z{gate}", (N, HIDDEN)), (n, j),
                                sp.Sum(x[n, d] * W_i[j, d], (d, 0, D - 1)) + b_i[j]
                                + sp.Sum(h[n, i] * W_h[j, i], (i, 0, HIDDEN - 1)) + b_h[j]))
        return x, h, params, stages

    @property
    def blocks(self) -> dict[str, tuple[str, int]]:
        """Each of this part's parameters -> (PyTorch's stacked parameter, its gate block)."""
        return {f"{kind}_{side}{gate}": (f"{kind}_{side}h" if side == "i" else f"{kind}_hh",
                                         GATES.index(gate))
                for gate in self.gates for kind in ("W", "b") for side in "ih"}

    def math_key(self, in_shape):
        return (self.kind,)


class LSTMState(_LSTMPart):
    """The cell state's step of ``nn.LSTM``: ``c_new = sigmoid(zf)*c + sigmoid(zi)*tanh(zg)``
    (input ``x`` ``(N, D)``, previous ``h``, ``c`` ``(N, H)``)."""

    kind = "lstm_state"
    gates = "ifg"

    def forward_form(self, in_shape=None):
        n, j = index("n"), index("j")
        x, h, params, stages = self.gate_forms()
        c = Array("c", (N, HIDDEN))
        zi, zf, zg = (s.array for s in stages)
        stages.append(Stage(Array("c_new", (N, HIDDEN)), (n, j),
                            _sigmoid(zf[n, j]) * c[n, j]
                            + _sigmoid(zi[n, j]) * sp.tanh(zg[n, j])))
        return Forward(inputs=(x, h, c), params=tuple(params), stages=tuple(stages),
                       letters=CELL_LETTERS, through=tuple(s.name for s in stages[:-1]),
                       keep=("x", "h", "c", "zi", "zf", "zg"))


class LSTMOutput(_LSTMPart):
    """The hidden state's step of ``nn.LSTM``: ``h_new = sigmoid(zo)*tanh(c_new)`` (input ``x``
    ``(N, D)``, previous ``h``, this step's ``c_new`` ``(N, H)``)."""

    kind = "lstm_output"
    gates = "o"

    def forward_form(self, in_shape=None):
        n, j = index("n"), index("j")
        x, h, params, stages = self.gate_forms()
        c = Array("c_new", (N, HIDDEN))
        (zo,) = (s.array for s in stages)
        stages.append(Stage(Array("h_new", (N, HIDDEN)), (n, j),
                            _sigmoid(zo[n, j]) * sp.tanh(c[n, j])))
        return Forward(inputs=(x, h, c), params=tuple(params), stages=tuple(stages),
                       letters=CELL_LETTERS, through=("zo",), keep=("x", "h", "c_new", "zo"))


@register
class LSTM(_Unrolled):
    """``nn.LSTM(D, hidden, batch_first=True)`` (one layer, ``h_0 = c_0 = 0``): a step is
    :class:`LSTMState` (``c_new``) then :class:`LSTMOutput` (``h_new``), two states carried;
    the parameters are PyTorch's ``weight_ih_l0`` ``(4H, D)``, ``weight_hh_l0`` ``(4H, H)``,
    ``bias_ih_l0``, ``bias_hh_l0`` ``(4H,)``, their blocks of rows the gates i, f, g, o."""

    kind = "lstm"
    init = RNNCell.init
    stacked = len(GATES)

    def unrolled_cell(self, in_shape):
        parts = (LSTMState(self.hidden), LSTMOutput(self.hidden))
        blocks = {name: (stacked, block, len(GATES))
                  for part in parts for name, (stacked, block) in part.blocks.items()}
        return Cell(parts, ("h", "c"), blocks)

