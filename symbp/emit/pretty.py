"""Terminal output of ``symbp derive``: each layer's forward and derived backward formulas.

Index-notation formulas go through sympy's pretty printer; each is followed by its whole-array
form as NumPy prints it, and by what backward keeps from the forward pass.
"""

from __future__ import annotations

import sympy as sp

from ..declare.layers import Elementwise, Layer, Residual
from ..declare.net import Net
from ..derive.arrays import Lowering
from ..derive.layer import LayerDerivation, derive_layer
from ..derive.network import DerivedLayer, derive_network
from ..derive.readings import computed_form, gather_form, reading
from ..derive.verify import default_sizes, verify_layer
from .numpy_printer import numpy_code

INDENT = "    "
VERIFY_BATCHES = (2, 3)


def _pretty(lhs: sp.Expr, rhs: sp.Expr, unicode: bool) -> str:
    text = sp.pretty(sp.Eq(lhs, rhs, evaluate=False), use_unicode=unicode, wrap_line=False)
    return "\n".join(INDENT + line for line in text.splitlines())


def _array_line(derivation: LayerDerivation, name: str, expr: sp.Expr, indices) -> str:
    names = set(derivation.form.arrays) | {derivation.upstream.name}
    try:
        code = numpy_code(Lowering(names, derivation.form).lower(expr, indices))
    except Exception as err:  # noqa: BLE001 - a lowering gap is shown, not fatal here
        code = f"(no whole-array form: {err})"
    return f"{INDENT}{name} = {code}"


def layer_report(derivation: LayerDerivation, unicode: bool = True) -> list[str]:
    form = derivation.form
    lines = ["  forward:"]
    for stage in form.stages:
        lines.append(_pretty(stage.array[stage.indices], stage.expr, unicode))
        lines.append(_array_line(derivation, stage.name, stage.expr, stage.indices))
    intermediates = [a for a in derivation.staged if a.array.name not in derivation.vjp]
    if intermediates:
        lines.append("  backward, staged chain rule (each intermediate gradient computed once):")
        for adjoint in derivation.staged:
            lines.append(_pretty(adjoint.lhs, adjoint.expr, unicode))
    upstream = derivation.upstream.name
    given = f"given {upstream}" if form.output.array.dims else "the loss is the output"
    lines.append(f"  backward ({given}):")
    for adjoint in derivation.vjp.values():
        lines.append(_pretty(adjoint.lhs, adjoint.expr, unicode))
        said = reading(adjoint.expr, upstream)
        if said:
            gathered = gather_form(adjoint.expr, upstream)
            if gathered != adjoint.expr:
                lines.append(f"{INDENT}that is, with the deltas solved:")
                lines.append(_pretty(adjoint.lhs, gathered, unicode))
            lines.append(f"{INDENT}({said})")
        computed = computed_form(adjoint.expr, upstream, form.gather)
        lines.append(_array_line(derivation, adjoint.name, computed, adjoint.indices))
    if derivation.identities:
        lines.append("  identities the engine proved from the forward definitions:")
        for rule in derivation.identities:
            lines.append(_pretty(rule.lhs, rule.rhs, unicode))
    stored = ", ".join(derivation.stored) or "nothing"
    lines.append(f"  backward reads from the forward pass: {stored}")
    for carried in derivation.carried:
        kept = f"  the generated code keeps {carried.name} too (computed once for both passes):"
        lines.append(kept)
        lines.append(_pretty(carried.array[carried.indices], carried.math, unicode))
    return lines


def verification_lines(derivation: LayerDerivation) -> tuple[list[str], bool]:
    lines, ok = [], True
    batches = VERIFY_BATCHES if not derivation.form.elementwise else (2,)
    for batch in batches:
        sizes = default_sizes(derivation.form, batch=batch)
        for staged in (False, True) if len(derivation.staged) > len(derivation.vjp) else (False,):
            for verdict in verify_layer(derivation, sizes, staged=staged):
                ok &= verdict.proven
                sizes_text = ", ".join(f"{k}={v}" for k, v in verdict.sizes.items())
                what = "staged" if staged else "compact"
                status = "proven equal to direct differentiation" if verdict.proven else "FAILED"
                lines.append(
                    f"  verify {verdict.name} ({what}, {sizes_text}): {status} {verdict.detail}"
                )
    return lines, ok


def _heading(item: DerivedLayer) -> str:
    layer: Layer = item.layer
    shapes = f"{list(item.placed.in_shape)} -> {list(item.placed.out_shape)}"
    params = item.placed.param_shapes
    text = f"== {item.name}: {layer.describe()}  per sample {shapes}"
    if params:
        text += "; params " + ", ".join(f"{k} {list(v)}" for k, v in params.items())
    return text


def derivation_report(
    net: Net, *, layer: str | None = None, verify: bool = False, unicode: bool = True
) -> tuple[str, bool]:
    """The text of ``symbp derive`` and whether every requested proof succeeded."""
    derivation = derive_network(net)
    items = derivation.layers
    if layer is not None:
        net.find(layer)  # raises a SpecError naming the missing layer
        items = [i for i in items if i.name == layer]
    lines = []
    if layer is None:
        shape = list(net.input_shape)
        lines.append(
            f"network {net.name}: input {shape} per sample, loss {net.loss and net.loss.kind}"
        )
    ok, verified = True, set()
    for item in items:
        lines.append(_heading(item))
        if isinstance(item.layer, Residual):
            lines.append(f"  y = x + F(x), F = {', '.join(b.name for b in item.placed.body)}")
        lines += layer_report(item.derivation, unicode)
        if verify and id(item.derivation) not in verified:
            verified.add(id(item.derivation))
            proof, passed = verification_lines(item.derivation)
            lines += proof
            ok &= passed
    if layer is None and derivation.loss is not None:
        lines.append(f"== loss: {net.loss.kind}")
        lines += layer_report(derivation.loss, unicode)
        if verify:
            proof, passed = verification_lines(derivation.loss)
            lines += proof
            ok &= passed
    if layer is None:
        lines.append("== backward order (each upstream gradient computed once and reused):")
        for name, upstream, produced in derivation.backward_chain():
            lines.append(f"  {name}: from {upstream} -> {produced}")
    return "\n".join(lines), ok


def expression_report(
    layer: Elementwise, *, verify: bool = False, unicode: bool = True
) -> tuple[str, bool]:
    derivation = derive_layer(layer.forward_form((1,)))
    lines = [f"== activation {layer.text}"] + layer_report(derivation, unicode)
    ok = True
    if verify:
        proof, ok = verification_lines(derivation)
        lines += proof
    return "\n".join(lines), ok
