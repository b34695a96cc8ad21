"""A layer unrolled over time (rnn, lstm): its derivation is its cell's, applied at each step.

A layer that declares :meth:`~symbp.declare.base.Layer.unrolled_cell` is seen by the network
plan as one layer (``x`` ``(N, T, D)`` in, its states out, its parameters); what it derives is
each of the cell's parts (:class:`~symbp.declare.base.Cell`: one per state, the LSTM's ``c_new``
then ``h_new``), and what its backward keeps is each array a part's backward reads, stacked over
the steps (``<name>_steps``, ``(T, N, ...)``; an array two parts read is kept once).
Backpropagation through time is the parts' derived backward run for t = T-1..0 in reverse part
order, each state's gradient handed to the step before and the weights' gradients summed over
t (the loop is printed by :mod:`symbp.emit.unrolled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .. import naming
from ..declare.base import SEQ_DIMS, Cell
from ..declare.forms import Array, Forward
from .derivation import LayerDerivation
from .layer import derive_layer

STEPS = SEQ_DIMS[0]


def steps_name(name: str) -> str:
    """What the layer keeps of the cell's kept array ``name``: its values at every step."""
    return f"{name}_steps"


@dataclass
class UnrolledDerivation(LayerDerivation):
    """The layer's own ``form`` (one input, the output, the layer's parameters), its declared
    ``cell`` and the derivation of each of the cell's parts (``parts``, in the cell's order)."""

    cell: Cell | None = None
    parts: tuple[LayerDerivation, ...] = ()

    @property
    def step_input(self) -> str:
        """The name of the step's input in the parts' forms (``x``)."""
        return self.parts[0].form.inputs[0].name

    @property
    def part_states(self) -> tuple[str, ...]:
        """The state each part computes the new value of, in the parts' order."""
        return tuple(self.cell.part_state(p) for p in self.cell.parts)

    def layer_param(self, name: str) -> str:
        """The layer's parameter that the parts' parameter ``name`` is (a block of)."""
        return self.cell.blocks.get(name, (name,))[0]

    @property
    def kept_names(self) -> tuple[str, ...]:
        """The arrays the parts' backward read, each once, in the parts' order."""
        names: dict[str, None] = {}
        for part in self.parts:
            names.update(dict.fromkeys(a.name for a in part.cached))
        return tuple(names)

    def kept_role(self, name: str) -> tuple[str, str]:
        """What a kept array is at step t: ``("input", x)`` (the step's input),
        ``("state", s)`` (state ``s`` before the step), ``("new", s)`` (after it) or
        ``("own", name)`` (a part's intermediate, its gates)."""
        if name == self.step_input:
            return "input", name
        if name in self.cell.states:
            return "state", name
        state = name.removesuffix("_new")
        if state != name and state in self.cell.states:
            return "new", state
        return "own", name

    @property
    def cached(self) -> tuple[Array, ...]:
        arrays = {}
        for part in self.parts:
            arrays.update({a.name: a for a in part.cached})
        return tuple(Array(steps_name(name), (STEPS, *arrays[name].dims))
                     for name in self.kept_names)

    @property
    def kept_storage(self) -> dict[str, Array]:
        """The steps' inputs are the layer's input; each state's values before and after the
        steps (``h_steps``, ``h_new_steps``) are views of one array of the T + 1 states
        (``h_all``), as is the last state, the output (unless ``sequence``, a copy)."""
        dims = self.form.output.array.dims
        storage = {steps_name(self.step_input): self.form.inputs[0]}
        for state in self.cell.states:
            whole = Array(f"{state}_all", (STEPS + 1, dims[0], dims[-1]))
            storage[steps_name(state)] = storage[steps_name(f"{state}_new")] = whole
        if len(dims) == 2:  # the last state
            storage[self.form.output.name] = storage[steps_name(self.cell.states[0])]
        return storage

    @property
    def params_read(self) -> tuple[Array, ...]:
        read = {self.layer_param(p.name) for part in self.parts for p in part.params_read}
        return tuple(p for p in self.form.params if p.name in read)

    @property
    def states(self) -> tuple[tuple[Array, Array], ...]:
        """The cell's states, each as ``(state, next)``: an input ``s`` of the parts (after the
        step's input) and the part's output ``s_new`` that computes it for the next step, in
        the cell's order (rnn: ``h`` and ``h_new``; the LSTM's ``h``, ``h_new`` and ``c``,
        ``c_new``). The first state is the layer's output."""
        inputs = {a.name: a for part in self.parts for a in part.form.inputs}
        outputs = {part.form.output.name: part.form.output.array for part in self.parts}
        return tuple((inputs[s], outputs[f"{s}_new"]) for s in self.cell.states if s in inputs)

    @property
    def step(self) -> LayerDerivation | None:
        """The derivation of the cell's one part, one whole step (rnn); ``None`` where a step
        is several parts (lstm)."""
        return self.parts[0] if len(self.parts) == 1 else None


def derive_unrolled(form: Forward, cell: Cell, in_shape) -> UnrolledDerivation:
    """The derivation of a layer of form ``form`` running ``cell`` over the steps."""
    parts = tuple(derive_layer(part.forward_form(in_shape)) for part in cell.parts)
    computed = sorted(map(cell.part_state, cell.parts))  # each part's output, a new state
    if computed != sorted(cell.states):
        raise ValueError(f"a cell's parts compute {computed}, its states are {cell.states}")
    return UnrolledDerivation(form=form, staged=[], vjp={}, stored=(), cell=cell, parts=parts)


TIME = sp.Symbol("t", integer=True)


def _over_time(derivation: UnrolledDerivation, part: LayerDerivation, expr: sp.Expr,
               step: sp.Expr) -> sp.Expr:
    """``expr``, a part's derived formula, read at ``step``: each array with the step as its
    first index (the step's input ``x[t]``, a state before the step ``h[t - 1]``, after it and
    its gradient ``h[t]``, ``dh[t]``, the gates ``zi[t]``), the parameters as they are."""
    params = {p.name for p in part.form.params}

    def at(name: str) -> tuple[str, sp.Expr]:
        gradient = name.startswith("d") and name not in part.form.arrays
        role, value = derivation.kept_role(name[1:] if gradient else name)
        shift = -1 if role == "state" else 0
        return (naming.adjoint(value) if gradient else value), step + shift

    def timed(e: sp.Indexed) -> sp.Expr:
        name = e.base.name
        if name in params:
            return e
        value, when = at(name)
        return sp.IndexedBase(value, real=True)[(when, *e.indices)]

    return expr.replace(lambda e: isinstance(e, sp.Indexed), timed)


def recurrence(derivation: UnrolledDerivation) -> list[tuple[sp.Expr, sp.Expr]]:
    """Backpropagation through time as the recurrence it is, each line ``lhs = rhs`` read off
    the parts' derivations: the parts' intermediate gradients at step t (``da[t]``, the gates'
    ``dzi[t]``), then each state's gradient before step t, ``dh[t - 1]``, the sum of what each
    part reading it hands back at t and what each part reading its value after the step hands
    back at t - 1 (``dc[t - 1]``: the state part's at t, the output part's at t - 1), and the
    step's input's ``dx[t]``. ``dh[t]`` is the total gradient of the state after step t."""
    states, parts, x = derivation.cell.states, derivation.parts, derivation.step_input
    lines = [(_over_time(derivation, part, a.lhs, TIME), _over_time(derivation, part, a.expr, TIME))
             for part in reversed(parts) for a in part.through.values()]

    def total(name: str, terms: list[tuple[LayerDerivation, str, sp.Expr]], step: sp.Expr):
        first = next(part.vjp[read] for part, read, _ in terms)
        rhs = sp.Integer(0)
        for part, read, when in terms:
            adjoint = part.vjp[read]
            rename = dict(zip(adjoint.indices, first.indices, strict=True))
            rhs += _over_time(derivation, part, adjoint.expr.xreplace(rename), when)
        lhs = sp.IndexedBase(naming.adjoint(name), real=True)[(step, *first.indices)]
        lines.append((lhs, rhs))

    for state in states:
        terms = [(part, state, TIME) for part in parts if state in part.vjp]
        terms += [(part, f"{state}_new", TIME - 1) for part in parts if f"{state}_new" in part.vjp]
        if terms:
            total(state, terms, TIME - 1)
    total(x, [(part, x, TIME) for part in parts if x in part.vjp], TIME)
    return lines
