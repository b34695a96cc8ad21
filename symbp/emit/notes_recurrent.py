"""The notes of a layer unrolled over time (rnn, lstm): its recurrence, forward and backward.

A layer that runs a cell over the time steps (:mod:`symbp.derivation.unrolled`) is printed from
the derivations of its cell's parts, once: the layer's section has each part's forward and
derived backward in the cell's own names (the LSTM's ``c_new`` part, then its ``h_new`` part),
and the forward pass and the delta recursion have the recurrence in the network's names,
indexed by the step ``t``::

    h_0 = 0,   a_t = h_{t-1} W_hh^T + x_t W_ih^T + b,   h_t = tanh(a_t),   t = 1..T
    dJ/dh_T = delta,   dJ/da_t = dJ/dh_t (1 - h_t^2),   dJ/dh_{t-1} = dJ/da_t W_hh,   ...
    dJ/dW_hh = sum_t (dJ/da_t)^T h_{t-1}

Each formula is the cell's derived one (its whole-array form, :meth:`_lowered`) with the cell's
names replaced by the network's at step ``t`` (:meth:`RecurrentSections.step_names`): the cell's
input ``x`` is the layer input's step ``t``; each state ``s`` the cell declares
(:attr:`~symbp.derivation.unrolled.UnrolledDerivation.states`) is the state at ``t - 1`` and its
``s_new`` the state at ``t``; the parameters are the layer's, shared by the steps, so that their
gradients are sums over ``t``. A state's gradient handed to step ``t - 1`` is the sum of what
the parts reading it hand back at ``t`` and what the parts reading its new value hand back at
``t - 1`` (the LSTM's ``dJ/dc_{t-1}``: the state part's at ``t``, the output part's at
``t - 1``). Nothing here knows which cell it prints.
"""

from __future__ import annotations

import sympy as sp

from ..derivation.network import DerivedLayer
from ..derivation.unrolled import STEPS
from ..errors import SpecError
from .latex_printer import ROW_SEPARATOR, AtLayer, Delta, Grad
from .notes_nodes import AtStep, ForSteps, StepIndex, StepsOf

H = sp.Symbol("h")
#: the time step of the notes' recurrences (1 to T: the state before the first step is h_0)
STEP = StepIndex("t", integer=True, positive=True)


def _real(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)  # the names of the engine's whole-array forms


def merged_math(maths: list[dict]) -> dict:
    """The layer section's math of a cell of several parts (lstm): each part's rows one after
    the other (the first part's alone for one part), its lists joined, a flag set where a
    part's is."""
    merged = dict(maths[0])
    for math in maths[1:]:
        for key, value in math.items():
            if key in ("forward", "staged", "vjp", "vjp_whole") and value and merged[key]:
                merged[key] = merged[key] + ROW_SEPARATOR + value
            elif isinstance(value, list):
                merged[key] = merged[key] + value
            elif key in ("multi_stage", "index_only", "windows"):
                merged[key] = merged[key] or value
            elif key == "proven":
                merged[key] = merged[key] and value
            elif not merged.get(key):
                merged[key] = value
    return merged


class RecurrentSections:
    """Methods of the notes builder (:mod:`symbp.emit.notes`) for layers unrolled over time."""

    def step_names(self, derived: DerivedLayer, target=None) -> dict[sp.Symbol, sp.Expr]:
        """The cell's names (every part's) as the network's at step :data:`STEP`; ``target``:
        the gradient of the layer's input, whose step ``t`` the cell's ``dx`` is
        (``delta^(l-1)``)."""
        unrolled, label = derived.derivation, sp.Symbol(self.labels[derived.name])
        before = sp.Symbol(self.inputs[derived.name])
        mapping: dict[str, sp.Expr] = {}
        for part in unrolled.parts:
            for name in part.form.arrays:  # the step's intermediates (a_t, the gates)
                mapping[name] = AtStep(AtLayer(sp.Symbol(name), label), STEP)
            for param in part.form.params:  # shared by the steps
                mapping[param.name] = AtLayer(sp.Symbol(param.name), label)
        step_input = unrolled.step_input
        mapping[step_input] = AtStep(AtLayer(H, before), STEP)
        for state, new in unrolled.states:
            symbol = H if state.name == unrolled.cell.states[0] else sp.Symbol(state.name)
            mapping[state.name] = AtStep(AtLayer(symbol, label), STEP - 1)
            mapping[new.name] = AtStep(AtLayer(symbol, label), STEP)
        gradients = {f"d{name}": Grad(node) for name, node in mapping.items()}
        gradients[f"d{step_input}"] = AtStep(target if target is not None else Delta(before), STEP)
        return {_real(name): node for name, node in {**mapping, **gradients}.items()}

    def _step_form(self, derived: DerivedLayer, part, adjoint_or_stage) -> sp.Expr:
        """A formula of a part of the cell in whole-array form (a clear error where it has
        none)."""
        lowered = self._lowered(part, adjoint_or_stage.expr, adjoint_or_stage.indices)
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
        """The states at 0, the parts' stages at ``t = 1..T``, the layer's output."""
        unrolled, names = derived.derivation, self.step_names(derived)
        rows = [(names[_real(state.name)].xreplace({STEP: 1}), sp.Integer(0))
                for state, _ in unrolled.states]
        for part in unrolled.parts:
            for stage in part.form.stages:
                rhs = self._step_form(derived, part, stage).xreplace(names)
                rows.append((names[_real(stage.name)], ForSteps(rhs, STEP, 1, STEPS)))
        output = AtLayer(H, sp.Symbol(self.labels[derived.name]))
        if self._is_sequence(derived):
            rows.append((output, StepsOf(output, 1, STEPS)))
        else:
            rows.append((output, AtStep(output, STEPS)))
        return rows

    def recurrent_local(self, derived: DerivedLayer) -> str:
        """``x = h^(0)_t, h = h^(1)_{t-1}, h_new = h^(1)_t``: the cell's names at step t."""
        unrolled, names = derived.derivation, self.step_names(derived)
        printer = self.whole_printer({k: v for part in unrolled.parts
                                      for k, v in part.form.arrays.items()})
        shown = [unrolled.parts[0].form.inputs[0]]
        for state, new in unrolled.states:
            shown += [state, new]
        return ", ".join(printer.equation(_real(a.name), names[_real(a.name)]) for a in shown)

    # -- backward: the delta recursion through time ------------------------------------------
    def recurrent_deltas(self, derived: DerivedLayer, target,
                         input_grad: bool = True) -> list[tuple[sp.Expr, sp.Expr]]:
        """Backpropagation through time, read off the parts' derivations: each state's
        gradient at ``T`` (the output's ``delta``, plus what a part reading the state's new
        value hands back at ``T``: the LSTM's ``c``), the parts' intermediate gradients at
        ``t = T..1`` (in reverse part order), each state's gradient handed to ``t - 1`` (down
        to ``t = 2``: ``h_0`` is no value of the network), the sum of what the parts reading
        it hand back at ``t`` and the parts reading its new value at ``t - 1``, the step
        input's, and the parameters' gradients summed over ``t``."""
        unrolled = derived.derivation
        parts, label = unrolled.parts, sp.Symbol(self.labels[derived.name])
        names = self.step_names(derived, target)
        sequence = self._is_sequence(derived)
        output = unrolled.cell.states[0]

        def handed(read: str, shift: int = 0) -> sp.Expr:
            """What the parts reading ``read`` hand back to it, at ``t + shift``."""
            total = sp.Integer(0)
            for part in parts:
                if read in part.vjp:
                    rhs = self._step_form(derived, part, part.vjp[read]).xreplace(names)
                    total += rhs.xreplace({STEP: STEP + shift}) if shift else rhs
            return total

        rows = []
        for state, new in unrolled.states:
            at_end = names[_real(f"d{new.name}")].xreplace({STEP: STEPS})
            rhs = handed(new.name).xreplace({STEP: STEPS})
            if state.name == output:
                rhs += AtStep(Delta(label), STEPS) if sequence else Delta(label)
            rows.append((at_end, rhs))
        for part in reversed(parts):
            for adjoint in part.through.values():
                rhs = sp.factor_terms(self._step_form(derived, part, adjoint).xreplace(names))
                rows.append((names[_real(adjoint.name)], ForSteps(rhs, STEP, STEPS, 1)))
        states = {state.name: new.name for state, new in unrolled.states}
        for read in parts[0].form.inputs:  # the step's input, then the states
            if read.name == unrolled.step_input and not input_grad:
                continue
            rhs, last = sp.factor_terms(handed(read.name)), 1
            if read.name in states:
                last = 2
                rhs += sp.factor_terms(handed(states[read.name], shift=-1))
                if sequence and read.name == output:  # the layer above's too
                    rhs = rhs + AtStep(Delta(label), STEP - 1)
            rows.append((names[_real(f"d{read.name}")], ForSteps(rhs, STEP, STEPS, last)))
        for part in parts:
            for param in part.form.params:
                adjoint = part.vjp[param.name]
                per_step = self._step_form(derived, part, adjoint).xreplace(names)
                rows.append((names[_real(adjoint.name)], sp.Sum(per_step, (STEP, 1, STEPS))))
        return rows
