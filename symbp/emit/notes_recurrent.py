"""The notes of a layer unrolled over time (rnn): its recurrence, forward and backward.

A layer that runs a cell over the time steps (:mod:`symbp.derivation.unrolled`) is printed from
its cell's derivation, once: the layer's section has the cell's forward and derived backward in
the cell's own names, and the forward pass and the delta recursion have the recurrence in the
network's names, indexed by the step ``t``::

    h_0 = 0,   a_t = h_{t-1} W_hh^T + x_t W_ih^T + b,   h_t = tanh(a_t),   t = 1..T
    dJ/dh_T = delta,   dJ/da_t = dJ/dh_t (1 - h_t^2),   dJ/dh_{t-1} = dJ/da_t W_hh,   ...
    dJ/dW_hh = sum_t (dJ/da_t)^T h_{t-1}

Each formula is the cell's derived one (its whole-array form, :meth:`_lowered`) with the cell's
names replaced by the network's at step ``t`` (:meth:`RecurrentSections.step_names`): the cell's
input ``x`` is the layer input's step ``t``; each state ``s`` the cell declares
(:attr:`~symbp.derivation.unrolled.UnrolledDerivation.states`) is the state at ``t - 1`` and its
``s_new`` the state at ``t``; the parameters are the layer's, shared by the steps, so that their
gradients are sums over ``t``. Nothing here knows which cell it prints.
"""

from __future__ import annotations

import sympy as sp

from ..derivation.network import DerivedLayer
from ..derivation.unrolled import STEPS
from ..errors import SpecError
from .latex_printer import AtLayer, Delta, Grad
from .notes_nodes import AtStep, ForSteps, StepIndex, StepsOf

H = sp.Symbol("h")
#: the time step of the notes' recurrences (1 to T: the state before the first step is h_0)
STEP = StepIndex("t", integer=True, positive=True)


def _real(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)  # the names of the engine's whole-array forms


def refuse_several_parts(derivation):
    """``derivation``, or a :class:`SpecError` naming the first layer whose step is several
    derived parts (lstm), which the notes cannot print yet (one part, rnn, they can)."""
    for item in derivation.layers:
        if item.derivation.cell is not None and item.derivation.step is None:
            raise SpecError(f"the notes cannot print {item.layer.kind} (unrolled over time, "
                            "its step of several parts) yet; the numpy, torch and jax targets, "
                            "check, derive and flow can", layer=item.name)
    return derivation


class RecurrentSections:
    """Methods of the notes builder (:mod:`symbp.emit.notes`) for layers unrolled over time."""

    def step_names(self, derived: DerivedLayer, target=None) -> dict[sp.Symbol, sp.Expr]:
        """The cell's names as the network's at step :data:`STEP`; ``target``: the gradient of
        the layer's input, whose step ``t`` the cell's ``dx`` is (``delta^(l-1)``)."""
        unrolled, label = derived.derivation, sp.Symbol(self.labels[derived.name])
        before = sp.Symbol(self.inputs[derived.name])
        form = unrolled.step.form
        mapping: dict[str, sp.Expr] = {}
        for name in form.arrays:  # the step's intermediates (a_t)
            mapping[name] = AtStep(AtLayer(sp.Symbol(name), label), STEP)
        for param in form.params:  # shared by the steps
            mapping[param.name] = AtLayer(sp.Symbol(param.name), label)
        step_input = form.inputs[0].name
        mapping[step_input] = AtStep(AtLayer(H, before), STEP)
        for state, new in unrolled.states:
            symbol = H if new.name == form.output.name else sp.Symbol(state.name)
            mapping[state.name] = AtStep(AtLayer(symbol, label), STEP - 1)
            mapping[new.name] = AtStep(AtLayer(symbol, label), STEP)
        gradients = {f"d{name}": Grad(node) for name, node in mapping.items()}
        gradients[f"d{step_input}"] = AtStep(target if target is not None else Delta(before), STEP)
        return {_real(name): node for name, node in {**mapping, **gradients}.items()}

    def _step_form(self, derived: DerivedLayer, adjoint_or_stage) -> sp.Expr:
        """A formula of the cell in whole-array form (a clear error where it has none)."""
        cell = derived.derivation.step
        lowered = self._lowered(cell, adjoint_or_stage.expr, adjoint_or_stage.indices)
        if lowered is None:
            raise SpecError(f"the notes cannot print {derived.layer.kind}'s step "
                            f"{adjoint_or_stage.array.name} in whole-array form yet",
                            layer=derived.name)
        return lowered

    def _is_sequence(self, derived: DerivedLayer) -> bool:
        """The layer's output is every state (``(N, T, H)``), not the last."""
        return STEPS in derived.derivation.form.output.array.dims

    def recurrent_context(self) -> dict[str, str] | None:
        """What the delta recursion's text names, printed (``None`` without such a layer)."""
        if all(d.derivation.cell is None for d in self.derivation.layers):
            return None
        whole, label = self.whole_printer(), sp.Symbol("l")
        state = AtStep(AtLayer(H, label), STEP)
        return {"state": whole.doprint(state), "gradient": whole.doprint(Grad(state)),
                "output": whole.doprint(AtStep(Delta(label), STEP))}

    # -- forward ---------------------------------------------------------------------------
    def recurrent_forward(self, derived: DerivedLayer) -> list[tuple[sp.Expr, sp.Expr]]:
        """The states at 0, the cell's stages at ``t = 1..T``, the layer's output."""
        unrolled, names = derived.derivation, self.step_names(derived)
        rows = [(names[_real(state.name)].xreplace({STEP: 1}), sp.Integer(0))
                for state, _ in unrolled.states]
        for stage in unrolled.step.form.stages:
            rhs = self._step_form(derived, stage).xreplace(names)
            rows.append((names[_real(stage.name)], ForSteps(rhs, STEP, 1, STEPS)))
        output = AtLayer(H, sp.Symbol(self.labels[derived.name]))
        if self._is_sequence(derived):
            rows.append((output, StepsOf(output, 1, STEPS)))
        else:
            rows.append((output, AtStep(output, STEPS)))
        return rows

    def recurrent_local(self, derived: DerivedLayer, printer) -> str:
        """``x = h^(0)_t, h = h^(1)_{t-1}, h_new = h^(1)_t``: the cell's names at step t."""
        unrolled, names = derived.derivation, self.step_names(derived)
        shown = [unrolled.step.form.inputs[0]]
        for state, new in unrolled.states:
            shown += [state, new]
        return ", ".join(printer.equation(_real(a.name), names[_real(a.name)]) for a in shown)

    # -- backward: the delta recursion through time ------------------------------------------
    def recurrent_deltas(self, derived: DerivedLayer, target,
                         input_grad: bool = True) -> list[tuple[sp.Expr, sp.Expr]]:
        """Backpropagation through time: each state's gradient at ``T``, the cell's backward at
        ``t = T..1`` (a state's gradient handed to ``t - 1``, down to ``t = 2``: ``h_0`` is no
        value of the network), the parameters' gradients summed over ``t``."""
        unrolled = derived.derivation
        cell, label = unrolled.step, sp.Symbol(self.labels[derived.name])
        names = self.step_names(derived, target)
        sequence = self._is_sequence(derived)
        output = cell.form.output.name
        rows = []
        for _, new in unrolled.states:
            at_end = names[_real(f"d{new.name}")].xreplace({STEP: STEPS})
            if new.name != output:
                rows.append((at_end, sp.Integer(0)))
            else:
                rows.append((at_end, AtStep(Delta(label), STEPS) if sequence else Delta(label)))
        states = {state.name: new.name for state, new in unrolled.states}
        inputs = [cell.vjp[a.name] for a in cell.form.inputs if a.name in cell.vjp]
        for adjoint in (*cell.through.values(), *inputs):
            if adjoint.array.name == cell.form.inputs[0].name and not input_grad:
                continue
            rhs = sp.factor_terms(self._step_form(derived, adjoint).xreplace(names))
            last = 1
            if adjoint.array.name in states:
                last = 2
                if sequence and states[adjoint.array.name] == output:  # the layer above's too
                    rhs = rhs + AtStep(Delta(label), STEP - 1)
            rows.append((names[_real(adjoint.name)], ForSteps(rhs, STEP, STEPS, last)))
        for param in cell.form.params:
            adjoint = cell.vjp[param.name]
            per_step = self._step_form(derived, adjoint).xreplace(names)
            rows.append((names[_real(adjoint.name)], sp.Sum(per_step, (STEP, 1, STEPS))))
        return rows
