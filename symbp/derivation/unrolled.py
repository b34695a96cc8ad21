"""A layer unrolled over time (rnn): its derivation is its cell's, applied at each step.

A layer that declares :meth:`~symbp.declare.base.Layer.unrolled_cell` is seen by the network
plan as one layer (``x`` ``(N, T, D)`` in, its states out, its parameters); what it derives is
the cell's derivation, and what its backward keeps is each of the cell's kept arrays stacked over
the steps (``<name>_steps``, ``(T, N, ...)``). Backpropagation through time is that derived cell
backward run for t = T-1..0 with the state gradient handed to the step before and the weights'
gradients summed over t (the loop is printed by :mod:`symbp.emit.module`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..declare.base import SEQ_DIMS, Layer
from ..declare.forms import Array, Forward
from .derivation import LayerDerivation
from .layer import derive_layer

STEPS = SEQ_DIMS[0]


def steps_name(name: str) -> str:
    """What the layer keeps of the cell's kept array ``name``: its values at every step."""
    return f"{name}_steps"


@dataclass
class UnrolledDerivation(LayerDerivation):
    """The layer's own ``form`` (one input, the output, the cell's parameters) and the cell's
    derivation ``cell`` (of the layer ``cell_layer``)."""

    cell: LayerDerivation | None = None
    cell_layer: Layer | None = None

    @property
    def cached(self) -> tuple[Array, ...]:
        return tuple(Array(steps_name(a.name), (STEPS, *a.dims)) for a in self.cell.cached)

    @property
    def params_read(self) -> tuple[Array, ...]:
        return self.cell.params_read

    @property
    def states(self) -> tuple[tuple[Array, Array], ...]:
        """The cell's states, each as ``(state, next)``: an input ``s`` of the cell (after its
        first, the step's input) that a stage ``s_new`` computes for the next step, as the
        cell declares them (rnn: ``h`` and ``h_new``, the cell's output; an LSTM's ``c`` and
        ``c_new`` alike). The output's state is the layer's output."""
        arrays = self.cell.form.arrays
        return tuple((state, arrays[f"{state.name}_new"]) for state in self.cell.form.inputs[1:]
                     if f"{state.name}_new" in arrays)


def derive_unrolled(form: Forward, cell: Layer, in_shape) -> UnrolledDerivation:
    """The derivation of a layer of form ``form`` running ``cell`` over the steps."""
    derived = derive_layer(cell.forward_form(in_shape))
    return UnrolledDerivation(form=form, staged=[], vjp={}, stored=(), cell=derived,
                              cell_layer=cell)
