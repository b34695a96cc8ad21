"""Prove a layer's declared adjoint claim (:class:`symbp.declare.base.AdjointClaim`) by scalar
expansion at small concrete sizes: a transposed convolution's forward is conv2d's input gradient.

For the claim ``linear(x) = partner's derived dx with dy := x`` (same parameters), at concrete
sizes every element of ``x``, ``W`` and ``u`` is its own sympy symbol and two identities are
proved exactly (the difference expanded to the zero polynomial, :func:`.verify.is_zero`):

* *the derived formula*: each output element of ``linear``, written out from its declared
  forward, equals the same element of the partner's derived input gradient (the engine's
  formula, ``derive_layer``) with the upstream gradient's elements replaced by ``x``'s;
* *the adjoint*: ``<linear(x), u> = <x, partner(u)>`` with ``partner(u)`` written out from the
  partner's declared forward (no derivation involved).

Nothing numerical: a random point could only refute. The sizes default to the ones
``--verify`` uses for the layer itself (:func:`.verify.default_sizes`).
"""

from __future__ import annotations

import sympy as sp

from ..declare.forms import Forward
from .layer import adjoint_array, derive_layer
from .verify import Verdict, _Expander, _positions, _table_of, default_sizes, is_zero


def _symbols_of(form: Forward) -> set[sp.Symbol]:
    symbols = set(form.constants) | set(form.window_dims)
    for array in form.arrays.values():
        for dim in array.dims:
            symbols |= sp.sympify(dim).free_symbols
    return symbols


def _expand_stages(expander: _Expander, form: Forward, sizes) -> dict:
    """Every stage of ``form`` written out over the element symbols already in ``expander``;
    the output's table."""
    for stage in form.stages:
        table = {}
        for position in _positions(stage.array, sizes):
            binding = dict(zip(stage.indices, position, strict=True))
            table[position] = expander.expand(stage.expr, binding)
        expander.tables[stage.name] = table
    return expander.tables[form.output.name]


def _elements(name: str, array, sizes) -> dict:
    return {position: sp.Symbol("_".join([name, *map(str, position)]), real=True)
            for position in _positions(array, sizes)}


def prove_adjoint(layer, in_shape, sizes: dict | None = None) -> list[Verdict] | None:
    """The verdicts of ``layer``'s adjoint claim at ``sizes`` (symbols or names -> integers;
    default: the layer's own proof sizes), or ``None`` when it claims nothing."""
    claim = layer.adjoint_of(in_shape)
    if claim is None:
        return None
    own = claim.linear.forward_form(in_shape)
    other = claim.partner.forward_form(claim.partner_shape)
    if sizes is None:
        sizes = default_sizes(own)
    by_name = {str(k): int(v) for k, v in sizes.items()}
    named = {s.name: s for s in _symbols_of(own)}
    own_sizes = {named[name]: value for name, value in by_name.items() if name in named}
    for symbol, rule in own.size_rules.items():
        own_sizes[symbol] = int(rule.xreplace(own_sizes))
        by_name[symbol.name] = own_sizes[symbol]
    other_sizes = {s: by_name[claim.renames.get(s.name, s.name)]
                   for s in sorted(_symbols_of(other), key=str) if s not in other.size_rules}
    shown = {str(k): v for k, v in own_sizes.items()}
    for symbol, rule in other.size_rules.items():
        other_sizes[symbol] = int(rule.xreplace(other_sizes))
        mine = claim.renames.get(symbol.name, symbol.name)
        if other_sizes[symbol] != by_name.get(mine):
            return [Verdict(f"adjoint of {claim.statement}", shown, False,
                            f"the partner's {symbol} is {other_sizes[symbol]}, not {mine}")]

    # the layer's forward, x and W as symbols
    (x,), weight = own.inputs, own.params[0]
    expander = _Expander(own_sizes)
    expander.tables[x.name] = _elements("x", x, own_sizes)
    expander.tables[weight.name] = _elements("W", weight, own_sizes)
    forward = _expand_stages(expander, own, own_sizes)

    # the partner's derived input gradient, its upstream gradient read as x
    derivation = derive_layer(other)
    (px,), pweight = other.inputs, other.params[0]
    gradient = _Expander(other_sizes)
    gradient.tables[pweight.name] = expander.tables[weight.name]
    gradient.tables[adjoint_array(other.output.array).name] = expander.tables[x.name]
    derived = _table_of(gradient, derivation.vjp[px.name], other_sizes)
    differs = [p for p, value in forward.items() if not is_zero(value - derived.get(p, 0))]
    differs += [p for p in derived if p not in forward]
    verdicts = [Verdict(f"forward = {claim.statement} with dy := x", shown, not differs,
                        f"differs at {differs[:3]}" if differs else "")]

    # <linear(x), u> = <x, partner(u)>, the partner's forward written out over u
    partner = _Expander(other_sizes)
    partner.tables[px.name] = _elements("u", px, other_sizes)
    partner.tables[pweight.name] = expander.tables[weight.name]
    image = _expand_stages(partner, other, other_sizes)
    left = sp.Add(*[value * partner.tables[px.name][p] for p, value in forward.items()])
    right = sp.Add(*[value * expander.tables[x.name][p] for p, value in image.items()])
    verdicts.append(Verdict(f"<forward(x), u> = <x, {claim.partner.kind}(u)>", shown,
                            is_zero(left - right)))
    return verdicts


def adjoint_lines(layer, in_shape):
    """``symbp derive --verify``'s lines for the claim, with whether each was proved."""
    for verdict in prove_adjoint(layer, in_shape) or ():
        sizes = ", ".join(f"{k}={v}" for k, v in verdict.sizes.items())
        status = "proven (scalar expansion)" if verdict.proven else "FAILED"
        detail = f" {verdict.detail}" if verdict.detail else ""
        yield f"  verify adjoint: {verdict.name} ({sizes}): {status}{detail}", verdict.proven
