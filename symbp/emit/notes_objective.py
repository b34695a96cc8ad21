"""The notes' account of weight decay: the objective ``J = L + s``, named as d2l names it.

``L`` is the loss, ``s = lambda/2 (||W^(1)||^2 + ...)`` the regulariser (cs231n's
``0.5 * reg * sum(W**2)``), ``J = L + s`` the objective. Each term of ``s`` is the engine's
derivation (:class:`~symbp.derivation.network.DecayTerm`); the notes print its definition, its
derived gradient ``ds/dW = lambda W`` and, read off the computational graph, the two paths along
which ``J`` reaches a covered weight: through ``L`` (the network's backward pass) and through
``s``. ``lambda`` is the spec's ``weight_decay`` (a name that prints as a word in code).
"""

from __future__ import annotations

from typing import Any

import sympy as sp

from ..declare.decay import WEIGHT_DECAY
from .latex_printer import ROW_SEPARATOR, AtLayer, Chain, Jacobian, NotesLatexPrinter

LAMBDA = sp.Symbol("lambda", positive=True)


class Scalar(sp.Symbol):
    """A scalar of the objective, ``J``, ``L`` or ``s``: printed as its letter (the notes'
    printer makes ``L`` the loss symbol and whole arrays bold)."""

    def _latex(self, printer) -> str:
        return self.name


J, L, S = Scalar("J"), Scalar("L"), Scalar("s")


class SquaredNorm(sp.Function):
    """``||W||^2``, the sum of the squares of a weight's elements (printing only)."""

    def _latex(self, printer) -> str:
        return rf"\lVert {printer._print(self.args[0])} \rVert^2"


def objective_section(builder) -> dict[str, Any] | None:
    """The template's ``objective`` (``None`` without weight decay); ``builder`` is the notes'
    builder (:class:`symbp.emit.notes._Builder`)."""
    from .notes import VERIFY_BATCHES, _proven, proof_sizes  # the notes' own proofs

    terms = builder.derivation.decay
    if not terms:
        return None
    settings = {**builder.settings, "notation": "d2l"}

    def printer(loss: str, arrays, whole: bool) -> NotesLatexPrinter:
        return NotesLatexPrinter({**settings, "loss_symbol": loss, "arrays": set(arrays),
                                  "whole": whole})

    named = NotesLatexPrinter({**settings, "loss_symbol": "L", "arrays": {"W"}, "whole": True,
                               "order": "none"})  # the terms in the order written
    weights = {}
    for term in terms:
        layer, param = term.key.rsplit(".", 1)
        weights[term.key] = AtLayer(sp.Symbol(param), sp.Symbol(builder.labels[layer]))
    rename = {WEIGHT_DECAY: LAMBDA}
    sections, paths = [], []
    for term in {id(t.derivation): t for t in terms}.values():
        derivation = term.derivation
        form, adjoint = derivation.form, derivation.vjp["W"]
        index = printer("s", form.arrays, False)
        rows = [index.rows([(s.array[s.indices], s.expr.xreplace(rename)) for s in form.stages]
                           + [(adjoint.lhs, adjoint.expr.xreplace(rename))])]
        lowered = builder._lowered(derivation, adjoint.expr, adjoint.indices)
        if lowered is not None:
            rows.append(printer("s", form.arrays, True).rows(
                [(sp.Symbol(adjoint.name, real=True), lowered.xreplace(rename))]))
        sizes = proof_sizes(derivation, VERIFY_BATCHES[0])
        sections.append({
            "on": [named.doprint(weights[t.key]) for t in terms if t.derivation is derivation],
            "rows": ROW_SEPARATOR.join(rows),
            "proven": _proven(derivation, staged=False),
            "proof_sizes": ", ".join(index.equation(k, sp.Integer(v)) for k, v in sizes.items()),
        })
    for term in terms:
        lowered = builder._lowered(term.derivation, term.derivation.vjp["W"].expr,
                                   term.derivation.vjp["W"].indices)
        weight = weights[term.key]
        own = lowered.xreplace(rename).xreplace({sp.Symbol("W", real=True): weight})
        paths.append((Jacobian(J, weight), sp.Add(Jacobian(L, weight), own, evaluate=False)))
    W = sp.Symbol("W")
    generic = sp.Add(Chain(Jacobian(J, L), Jacobian(L, W)), Chain(Jacobian(J, S), Jacobian(S, W)),
                     evaluate=False)
    return {
        "value": named.doprint(sp.Eq(LAMBDA, sp.Float(builder.net.weight_decay))),
        "weights": [named.doprint(w) for w in weights.values()],
        "forward": named.rows([
            (J, sp.Add(L, S, evaluate=False)),
            (S, LAMBDA / 2 * sp.Add(*[SquaredNorm(w) for w in weights.values()],
                                    evaluate=False)),
        ]),
        "terms": sections,
        "generic": named.rows([(Jacobian(J, W), generic)]),
        "paths": named.rows(paths),
    }
