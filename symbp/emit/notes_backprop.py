"""The notes' backpropagation sections: chain rules, the delta recursion, gradient flow,
activations.

:class:`BackpropSections` is mixed into the notes builder (:mod:`symbp.emit.notes`); it reads
the network plan (:mod:`symbp.derivation.plan`): the delta recursion follows its backward steps, a
block's ``Sum`` giving the row where the skip's and the body's gradients meet, and each chain
rule follows the plan's readers from a layer up to the output.
"""

from __future__ import annotations

from typing import Any

import sympy as sp

from ..derivation.network import DerivedLayer
from ..derivation.plan import Sum
from .latex_printer import (
    ROW_SEPARATOR,
    AtLayer,
    Chain,
    Delta,
    Element,
    Ellipsis_,
    Grad,
    Identity,
    Jacobian,
    Norm,
    NotesLatexPrinter,
)
from .notes_math import (
    X_SCALAR,
    Y_SCALAR,
    _code,
    _largest_derivative,
    _text,
    activation_formulas,
)
from .notes_objective import Scalar

#: Chains longer than this many Jacobians are written with an ellipsis.
MAX_CHAIN = 8
H = sp.Symbol("h")


class BackpropSections:
    """Methods of the notes builder for the sections after the forward pass."""

    # -- chain rule and delta recursion ---------------------------------------------------------
    def delta_of(self, value: str, reader: str) -> Delta:
        """The gradient ``reader`` hands back to ``value``: ``delta^(v)``, or, where several
        layers read ``v`` (a graph's fan-out), its part ``delta^(v <- r)``."""
        label = self.labels[value]
        readers = self.plan.readers[value]
        if len(readers) > 1 and not self.plan.step(readers[-1]).placed.body:
            return Delta(sp.Symbol(rf"{label} \leftarrow {self.labels[reader]}"))
        return Delta(sp.Symbol(label))

    def fan_out(self) -> list[str]:
        """The values a graph reads more than once: each one's gradient is the sum of its
        readers' parts (rows of the delta recursion)."""
        return [self.labels[v] for v, readers in self.plan.readers.items()
                if len(readers) > 1 and not self.plan.step(readers[-1]).placed.body]

    def _path(self, name: str) -> list[str]:
        """Labels of the layers the gradient passes through from the output down to ``name``
        (exclusive), top first: the layers above it, and each residual block it is in.

        Followed up the plan's values: past a value read twice (a block's input), through the
        block that reads it last, whose Jacobian holds its body's."""
        path = []
        readers = self.plan.readers.get(self.plan.step(name).output, [])
        while readers:
            path.append(self.labels[readers[-1]])
            readers = self.plan.readers.get(self.plan.step(readers[-1]).output, [])
        return path[::-1]

    def _chains(self) -> str:
        whole = self.whole_printer()
        loss = Scalar(self.settings["loss_symbol"])  # a scalar: not bold as L the array was
        chains = []
        for item in self.net.walk():
            for key in item.layer.param_shapes(item.in_shape):
                label = sp.Symbol(self.labels[item.name])
                param = AtLayer(sp.Symbol(key), label)
                factors = [Jacobian(loss, AtLayer(H, sp.Symbol(self.depth)))]
                path = self._path(item.name)
                below = [*path[1:], self.labels[item.name]]
                for step, under in zip(path, below, strict=False):
                    factors.append(
                        Jacobian(AtLayer(H, sp.Symbol(step)), AtLayer(H, sp.Symbol(under)))
                    )
                factors.append(Jacobian(AtLayer(H, label), param))
                if len(factors) > MAX_CHAIN:
                    factors = factors[:3] + [Ellipsis] + factors[-3:]
                chains.append((Grad(param), Chain(*_chain_args(factors))))
        return whole.rows(chains)

    def _residual_jacobians(self) -> list[str]:
        whole = self.whole_printer()
        rows = []
        for item in self.net.walk():
            if not item.body:
                continue
            label = self.labels[item.name]
            last = self.labels[item.body[-1].name]
            rhs = Identity() + Jacobian(
                AtLayer(H, sp.Symbol(last)), AtLayer(H, sp.Symbol(self.inputs[item.name]))
            )
            rows.append(
                whole.equation(
                    Jacobian(
                        AtLayer(H, sp.Symbol(label)), AtLayer(H, sp.Symbol(self.inputs[item.name]))
                    ),
                    rhs,
                )
            )
        return rows

    def _deltas(self) -> dict[str, Any]:
        whole = self.whole_printer()
        index = self.network_index_printer()
        rows: list[str] = []
        pairs = _RowList(rows, whole)
        loss = self.derivation.loss
        if loss is not None:
            form = loss.form
            adjoint = loss.vjp[form.inputs[0].name]
            lowered = self._lowered(loss, adjoint.expr, adjoint.indices)
            output = AtLayer(H, sp.Symbol(self.depth))
            mapping = {sp.Symbol(form.inputs[0].name, real=True): output}
            pairs.append((Delta(sp.Symbol(self.depth)), lowered.xreplace(mapping)))
        by_name = {d.name: d for d in self.derivation.layers}
        for entry in self.plan.backward:
            if isinstance(entry, Sum) and not self.plan.step(
                    self.plan.readers[entry.value][-1]).placed.body:  # a graph's fan-out
                parts = [self.delta_of(entry.value, r) for r in self.plan.readers[entry.value]]
                pairs.append((Delta(sp.Symbol(self.labels[entry.value])), sp.Add(*parts)))
                continue
            if isinstance(entry, Sum):  # the block's input: its skip's gradient and its body's
                block = self.plan.readers[entry.value][-1]
                derived = by_name[block]
                derivation, form = derived.derivation, derived.derivation.form
                direct = derivation.vjp[form.inputs[0].name]
                lowered = self._lowered(derivation, direct.expr, direct.indices)
                pairs.append(
                    (
                        Delta(sp.Symbol(self.inputs[block])),
                        lowered.xreplace(self._network_names(derived))
                        + Delta(sp.Symbol(self.block_input[block])),
                    )
                )
                continue
            step = entry.step
            derived = by_name[step.name]
            derivation = derived.derivation
            if derivation.cell is not None:  # unrolled over time: backpropagation through time
                for pair in self.recurrent_deltas(derived, self._input_target(step),
                                                  bool(step.grad_inputs)):
                    pairs.append(pair)
                continue
            names = self._network_names(derived)
            form = derivation.form
            if len(step.inputs) > 1 and not step.placed.body:  # reading several values
                for array, value in zip(form.inputs, step.inputs, strict=True):
                    adjoint = derivation.vjp[array.name]
                    lowered = self._lowered(derivation, adjoint.expr, adjoint.indices)
                    target = self.delta_of(value, step.name)
                    if lowered is None:
                        rows.append(self._index_row(index, derived, adjoint, target=target))
                    else:
                        pairs.append((target, lowered.xreplace(names)))
                continue
            if len(step.inputs) > 1:  # a block: the gradient its body's output gets
                last = self.labels[step.inputs[1]]
                skip = derivation.vjp[form.inputs[1].name]
                lowered = self._lowered(derivation, skip.expr, skip.indices)
                pairs.append((Delta(sp.Symbol(last)), lowered.xreplace(names)))
                continue
            for param in form.params:
                adjoint = derivation.vjp[param.name]
                lowered = self._lowered(derivation, adjoint.expr, adjoint.indices)
                if lowered is None:
                    rows.append(self._index_row(index, derived, adjoint))
                    continue
                pairs.append(
                    (names[sp.Symbol("d" + param.name, real=True)], lowered.xreplace(names))
                )
            if not step.grad_inputs:  # integer ids: no gradient to hand down
                continue
            adjoint = derivation.vjp[form.inputs[0].name]
            lowered = self._lowered(derivation, adjoint.expr, adjoint.indices)
            target = self._input_target(step)
            if lowered is None:
                rows.append(self._index_row(index, derived, adjoint, target=target))
                continue
            pairs.append((target, lowered.xreplace(names)))
        return {"rows": ROW_SEPARATOR.join(rows)}

    def _input_target(self, step) -> Delta:
        """The gradient a one-input step hands to its input: ``delta^(l-1)``, a fan-out's
        part of it, or the body's part ``delta^(l.0)`` for the first layer of a block."""
        readers = self.plan.readers[step.inputs[0]]
        if len(readers) > 1 and readers[-1] not in self.block_input:  # a graph's fan-out
            return self.delta_of(step.inputs[0], step.name)
        if len(readers) > 1 and readers[0] == step.name:  # the first layer of a body
            return Delta(sp.Symbol(self.block_input[readers[-1]]))
        return Delta(sp.Symbol(self.inputs[step.name]))

    def _index_row(self, printer, derived: DerivedLayer, adjoint, *, target=None) -> str:
        """One backward row in index form and network names."""
        lhs = self._index_form(derived, adjoint.lhs)
        if target is not None:
            lhs = Element(target, *adjoint.indices)
        return printer.rows([(lhs, self._index_form(derived, adjoint.expr))])

    # -- gradient flow (rows computed by symbp.flow) ---------------------------------------------
    def flow_section(self, rows: list) -> dict[str, Any]:
        """Each distinct local Jacobian once, with its proven bound; the bound on the product
        of the Jacobians from the output down to each layer."""
        index = NotesLatexPrinter({**self.settings, "arrays": set()})
        whole = self.whole_printer()
        output = AtLayer(H, sp.Symbol(self.depth))
        entries, products = [], []
        first: dict[tuple, str] = {}
        for row in rows:
            label = self.labels[row.layer]
            read = row.jacobian  # None where the VJP is no formula in dy (max pooling)
            key = (row.kind, sp.srepr(read[1]) if read else None, row.reason)
            entry: dict[str, Any] = {
                "label": label,
                "name": _text(row.layer, self.fmt),
                "kind": _text(row.kind, self.fmt),
                "same_as": first.get(key),
                "over_time": getattr(row, "structure", None) == "recurrent",
                "bound": index.doprint(row.bound) if row.bound is not None else None,
                "reason": _code(row.reason, self.fmt),
            }
            if entry["same_as"] is None:
                first[key] = label
                entry["jacobian"] = (
                    index.rows([(Jacobian(read[0].expr, read[0].variables[0]), read[1])])
                    if read is not None
                    else None
                )
                derivative = getattr(row, "derivative", None)
                entry["derivative"] = (
                    index.rows([(sp.Derivative(sp.Function("f")(X_SCALAR), X_SCALAR), derivative)])
                    if derivative is not None
                    else None
                )
            entries.append(entry)
            if row.product is not None:
                below = AtLayer(H, sp.Symbol(self.inputs[row.layer]))
                products.append((Norm(Jacobian(output, below)), row.product))
        return {
            "entries": entries,
            "products": index.rows(products, relation="<=") if products else None,
            "output": whole.doprint(output),
        }

    # -- activations ----------------------------------------------------------------------------
    def _activations(self) -> list[dict[str, Any]]:
        entries = []
        seen: set[int] = set()
        counts: dict[int, int] = {}
        for derived in self.derivation.layers:
            if derived.layer.activation:
                counts[id(derived.derivation)] = counts.get(id(derived.derivation), 0) + 1
        for derived in self.derivation.layers:
            layer, derivation = derived.layer, derived.derivation
            if not layer.activation or id(derivation) in seen:
                continue
            seen.add(id(derivation))
            entries.append(self._activation(derived, counts[id(derivation)]))
        return entries

    def _activation(self, derived: DerivedLayer, count: int) -> dict[str, Any]:
        formulas = activation_formulas(derived.derivation)
        printer = NotesLatexPrinter({**self.settings, "arrays": set()})
        fx = sp.Function("f")(X_SCALAR)
        fprime = sp.Derivative(fx, X_SCALAR)
        rows = [(fx, formulas.f)] + [(fprime, d) for d in formulas.derivatives]
        in_x, compact = formulas.derivatives[0], formulas.derivatives[-1]
        constants = derived.constants  # this layer's (a shared derivation: the first's)
        ranges = {
            sp.Symbol(name, real=True): sp.Interval(*(sp.sympify(v).xreplace(constants)
                                                      for v in span))
            for name, span in derived.layer.aux_ranges().items()
        }
        bound = _largest_derivative(formulas.f, in_x, compact, constants, ranges)
        entry = {
            "name": _text(derived.layer.title(derived.name), self.fmt),
            "rows": printer.rows(rows),
            "in_output": Y_SCALAR in compact.free_symbols,
            "output": printer.equation(Y_SCALAR, fx),
            "bound": printer.doprint(bound) if bound is not None else None,
            "constants": [
                printer.doprint(sp.Contains(sp.Symbol(name, real=True), sp.Interval(*span)))
                for name, span in derived.layer.aux_ranges().items()
            ]
            + [printer.equation(s, v) for s, v in constants.items()],
            "vanishing": None,
        }
        if bound is not None and bound.is_number and bound < 1 and count > 1:
            entry["vanishing"] = {
                "count": count,
                "product": printer.doprint(sp.Pow(bound, count, evaluate=False)),
            }
        return entry


class _RowList:
    """Collects ``(lhs, rhs)`` pairs as printed rows, in order with rows printed otherwise."""

    def __init__(self, rows: list[str], printer: NotesLatexPrinter):
        self.rows, self.printer = rows, printer

    def append(self, pair) -> None:
        self.rows.append(self.printer.rows([pair]))


def _chain_args(factors) -> list:
    return [Ellipsis_ if f is Ellipsis else f for f in factors]
