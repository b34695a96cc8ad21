"""``symbp derive``'s section on the objective ``J = L + s`` where the network has weight decay.

The regulariser's term ``s = weight_decay/2 * sum W**2`` is derived like a layer
(:class:`~symbp.derivation.network.DecayTerm`) and shown like one (:func:`.pretty.layer_report`),
once per rank of the weights it covers; then, for each covered weight, the gradient of ``J``,
which reaches it along two paths: through ``L`` (the backward pass above) and through ``s``.
"""

from __future__ import annotations

from collections.abc import Iterator

import sympy as sp
from sympy.printing.pretty.pretty_symbology import pretty_use_unicode

from ..derivation.network import NetworkDerivation
from .pretty import INDENT, Block, Picture, Report, Text, _Printer, _proofs, layer_report


def objective_blocks(derivation: NetworkDerivation, unicode: bool, report: Report,
                     verify: bool, progress) -> Iterator[Block]:
    net = derivation.net
    terms = derivation.decay
    yield Text(f"== objective: J = L + s, the loss L ({net.loss.kind}) plus weight decay's "
               f"regulariser s, lambda = weight_decay = {net.weight_decay!r}, on "
               f"{', '.join(t.key for t in terms)}")
    yield Text("  s = weight_decay/2 * (the sum of ||W||^2 over those weights), one term per "
               "weight, each derived as a layer is (W: the weight, s: its term)")
    shown: dict[int, list[str]] = {}
    for term in terms:
        shown.setdefault(id(term.derivation), []).append(term.key)
    for term in {id(t.derivation): t for t in terms}.values():
        yield Text(f"  term on {', '.join(shown[id(term.derivation)])}:")
        for block in layer_report(term.derivation, unicode):
            if isinstance(block, Text) and block.text.startswith("  backward ("):
                block = Text("  backward (dJ/ds = 1):")
            yield block
        if verify:
            yield from _proofs(report, term.derivation, "weight decay", progress)
    yield Text("  J's gradient reaches each of these weights along two paths: through L (the "
               "backward pass, dL/dW) and through s (its derived ds/dW):")
    for term in terms:
        adjoint = term.derivation.vjp["W"]
        W = term.derivation.form.inputs[0].base
        own, path = (sp.IndexedBase(f"d{loss}/d{term.key}", real=True) for loss in "JL")
        weight = sp.IndexedBase(term.key, real=True)
        rhs = sp.Add(path[adjoint.indices], adjoint.expr.xreplace({W: weight}), evaluate=False)
        yield _in_order(own[adjoint.indices], rhs, unicode)
    yield Text(f"{INDENT}(the generated loss_and_grads returns J and these gradients)")


def _in_order(lhs: sp.Expr, rhs: sp.Expr, unicode: bool) -> Picture:
    """``lhs = rhs`` drawn with ``rhs``'s terms in their order (dL/dW first, then ds/dW)."""
    flag = pretty_use_unicode(unicode)
    try:
        printer = _Printer({"use_unicode": unicode, "wrap_line": False, "order": "none"})
        drawn = printer._print(sp.Eq(lhs, rhs, evaluate=False))
    finally:
        pretty_use_unicode(flag)
    rows = tuple(INDENT + row for row in drawn.picture)
    return Picture(rows, drawn.baseline, f"{INDENT}{sp.sstr(lhs)} = {sp.sstr(rhs, order='none')}")
