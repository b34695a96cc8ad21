"""The generated module's objective: ``J = L + s`` with weight decay's regulariser ``s``.

Each term of ``s`` (:class:`~symbp.declare.decay.WeightDecay`, one per covered parameter) is
derived like a layer (:class:`~symbp.derivation.network.DecayTerm`) and printed like one: a
``weight_decay_forward(W, *, weight_decay)`` returning the term and what its backward reads, a
``weight_decay_backward`` returning the derived ``ds/dW``; one pair per rank of the covered
parameters (``weight_decay_2d_...`` and ``weight_decay_4d_...`` where linear and conv weights
mix). ``templates/module.py.j2`` prints the module's ``regularizer`` from this context and has
``loss_and_grads`` return ``J``.
"""

from __future__ import annotations

from typing import Any

import sympy as sp

from ..derivation.network import NetworkDerivation
from ..naming import backward_function, forward_function

#: the stem of the regulariser's term functions
STEM = "weight_decay"


def regularizer_context(builder, derivation: NetworkDerivation) -> dict[str, Any] | None:
    """What the template needs to print the regulariser (``None``: no weight decay); adds the
    terms' functions to ``builder`` (a :class:`~symbp.emit.module.ModuleBuilder`)."""
    terms = derivation.decay
    if not terms:
        return None
    net = derivation.net
    ranks = list(dict.fromkeys(t.derivation.form.inputs[0].rank for t in terms))
    taken = set(builder.stems.values())
    stems: dict[int, str] = {}
    for term in terms:
        rank = term.derivation.form.inputs[0].rank
        if rank in stems:
            continue
        stem = STEM if len(ranks) == 1 else f"{STEM}_{rank}d"
        while stem in taken:  # a user's layer called weight_decay
            stem += "_term"
        taken.add(stem)
        stems[rank] = stem
        builder.layer_functions(stem, term.term, term.derivation, None)
    # a term's derived gradient that reads W at its own element alone is added in blocks
    # (symbp.runtime.blocks): no temporary as large as the weight
    blocks = all(_elementwise(t.derivation) for t in terms)
    if blocks:
        builder.helpers.add("_add_blocks")
    return {
        "blocks": blocks,
        "value": repr(float(net.weight_decay)),
        "params": [t.key for t in terms],
        "terms": [
            (t.key, forward_function(stems[r]), backward_function(stems[r]))
            for t in terms
            for r in [t.derivation.form.inputs[0].rank]
        ],
    }


def _elementwise(derivation) -> bool:
    """Whether ``ds/dW`` at an element reads ``W`` at that element alone (``weight_decay*W``)."""
    adjoint = derivation.vjp["W"]
    reads = adjoint.expr.atoms(sp.Indexed)
    return not adjoint.expr.has(sp.Sum) and all(r.indices == adjoint.indices for r in reads)
