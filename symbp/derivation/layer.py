"""Derive one layer's vector-Jacobian products from its forward definition.

Given ``Forward`` (index notation, symbolic sizes) the engine computes, for every differentiable
input and parameter ``v`` and upstream gradient ``dy``::

    dv[idx] = sum over stages s that read v, sum over s's indices I of  ds[I] * d s[I] / d v[idx]

in reverse stage order (the *staged* chain rule: each stage's adjoint is computed once and reused,
backprop as dynamic programming). Then it produces the *compact* form: every intermediate adjoint
inlined, the result rewritten in terms of what the layer keeps from the forward pass (batch norm's
``xhat`` and ``invstd``, sigmoid's output ``y``), simplified with the sum identities that follow
from the forward definitions themselves (``Sum_m xhat[m, j] = 0``), and tidied.

Nothing here knows any particular layer: no derivative is written down anywhere.
"""

from __future__ import annotations

import sympy as sp

from .. import naming
from ..declare.forms import Array, Forward
from ..errors import DerivationError
from .arrays import ArrayOp, Erfc, Sigmoid, Softplus
from .derivation import Adjoint, Carried, LayerDerivation, Rule, adjoint_array, as_math
from .indexing import fresh_index, freshen_bound, simplify_indexed
from .keep import (
    _acceptable,
    _is_index,
    _keep_candidates,
    _polynomial_in,
    _rules_towards,
    _same_values,
    _sum_identities,
    apply_rules,
)
from .kept import argmax_values, carried_read
from .kinks import differentiate
from .readings import computed_form
from .stable import log_sum_exp_terms, softmax_form, stabilize

#: re-exported: what the engine derives (:mod:`.derivation`), read by the printers
__all__ = [
    "Adjoint", "Carried", "LayerDerivation", "Rule", "adjoint_array", "apply_rules", "as_math",
    "bound_names", "derive_layer", "tidy_expression",
]


def derive_layer(form: Forward) -> LayerDerivation:
    """Staged and compact vector-Jacobian products of one layer."""
    names = bound_names(form)
    scalar_output = not form.output.array.dims
    staged = _staged_adjoints(form, names, unit_upstream=scalar_output)
    by_name = {adj.array.name: adj for adj in staged}

    def compact_with(keep: tuple[str, ...]) -> LayerDerivation:
        rules = _rules_towards(form, keep)
        identities = _sum_identities(form, rules, names)
        vjp, steps, through = {}, {}, {}
        for adjoint in staged:  # reverse stage order, as they are computed
            if adjoint.array.name in form.through:
                through[adjoint.array.name], steps[adjoint.array.name] = _compact(
                    adjoint, by_name, rules, identities, names, form)
        for array in form.differentiable:
            compact, trail = _compact(by_name[array.name], by_name, rules, identities, names, form)
            vjp[array.name] = compact
            steps[array.name] = trail
        stored = _stored(form, {**through, **vjp})
        return LayerDerivation(form, staged, vjp, stored, rules, identities, steps,
                               through=through)

    best = None
    for keep in _keep_candidates(form):
        derivation = compact_with(keep)
        if best is None:
            best = derivation
        if _acceptable(form, derivation, keep):
            if form.keep is None and keep:
                derivation = _polynomial_in(derivation, keep)
                if derivation is None:
                    continue  # a rational function of the output: it divides by 1 - y near 1
                if not _same_values(form, derivation, compact_with(())):
                    continue  # the kept output does not determine the derivative
            best = derivation
            break
    assert best is not None
    best.carried = carried_values(best)
    if best.carried:
        best.code_reads = _code_reads(best)
    return best


def bound_names(form: Forward) -> dict[sp.Expr, str]:
    """Letters for bound indices: a sum over the batch runs over ``m``, over features ``k``."""
    names: dict[sp.Expr, str] = {}
    # a size two axes of one array run over (attention's scores, T x T) has t and t' free
    twice = {d for a in form.arrays.values() for d in a.dims if a.dims.count(d) > 1}
    for dim, letter in form.letters.items():
        bound = letter + ("''" if dim in twice else "'")
        names[dim - 1] = {"n": "m", "j": "k", "i": "k", "c": "k"}.get(letter, bound)
    return names


# -- the staged chain rule ----------------------------------------------------------------------
def _staged_adjoints(form: Forward, names, *, unit_upstream: bool) -> list[Adjoint]:
    output = form.output
    adjoints: list[Adjoint] = []
    known: dict[str, sp.Expr] = {}
    targets = [s.array for s in reversed(form.stages[:-1])] + list(form.differentiable)
    for target in targets:
        free = tuple(fresh_index(i) for i in form.indices_for(target))
        element = target[free]
        total = sp.Integer(0)
        for stage in form.stages:
            if not stage.expr.has(target.base):
                continue
            upstream = adjoint_array(stage.array)[stage.indices]
            if stage is output and unit_upstream:
                upstream = sp.Integer(1)
            derivative = differentiate(stage.expr, element)  # the kink conventions applied
            contribution = upstream * derivative
            # Sum over the stage's own indices (they are bound in the chain rule).
            if stage.indices:
                limits = [
                    (i, 0, d - 1) for i, d in zip(stage.indices, stage.array.dims, strict=True)
                ]
                contribution = sp.Sum(contribution, *limits)
            total += contribution
        canonical = form.indices_for(target)
        expr = simplify_indexed(total, names).xreplace(dict(zip(free, canonical, strict=True)))
        adjoint = Adjoint(target, canonical, expr)
        adjoints.append(adjoint)
        known[target.name] = expr
    return adjoints


# -- the compact form ---------------------------------------------------------------------------
def _compact(adjoint, by_name, rules, identities, names, form):
    steps: list[tuple[str, sp.Expr]] = [("chain rule through the stages", adjoint.expr)]
    expr = _inline(adjoint.expr, by_name, form)
    expr = simplify_indexed(expr, names)
    if expr != adjoint.expr:
        steps.append(("intermediate gradients substituted", expr))
    if rules:
        rewritten = simplify_indexed(sp.expand(apply_rules(expr, rules)), names)
        rewritten = simplify_indexed(apply_rules(rewritten, identities), names)
        if rewritten != expr:
            expr = rewritten
            steps.append(("in terms of the kept forward values", expr))
    tidy = tidy_expression(expr)
    if tidy != expr:
        steps.append(("collected", tidy))
    return Adjoint(adjoint.array, adjoint.indices, tidy), steps


def _inline(expr: sp.Expr, by_name: dict[str, Adjoint], form: Forward) -> sp.Expr:
    """Substitute every intermediate adjoint ``dS[..]`` by its formula, repeatedly."""
    intermediate = {s.name for s in form.stages[:-1]} - set(form.through)
    formulas = {naming.adjoint(name): by_name[name] for name in intermediate}

    def is_pending(element) -> bool:
        if isinstance(element, sp.Indexed):
            return element.base.name in formulas
        return (
            isinstance(element, sp.Symbol)
            and element.name in formulas
            and not formulas[element.name].array.dims
        )

    def substitute(element):
        adjoint = formulas[_name(element)]
        indices = element.indices if isinstance(element, sp.Indexed) else ()
        return freshen_bound(adjoint.expr).xreplace(
            dict(zip(adjoint.indices, indices, strict=True))
        )

    for _ in range(len(formulas) + 1):
        if not any(is_pending(e) for e in _elements(expr)):
            return expr
        expr = expr.replace(is_pending, substitute)
    raise DerivationError("intermediate adjoints do not resolve (cyclic stages?)")


def _elements(expr: sp.Expr) -> set[sp.Expr]:
    """Array elements and scalar arrays in ``expr`` (not the labels inside ``Indexed``)."""
    indexed = expr.atoms(sp.Indexed)
    labels = {e.base.label for e in indexed}
    return indexed | {s for s in expr.atoms(sp.Symbol) if s not in labels}


def _name(element) -> str:
    return element.base.name if isinstance(element, sp.Indexed) else element.name


def tidy_expression(expr: sp.Expr) -> sp.Expr:
    """Combine exponentials and pull common factors out, without touching the sums' insides.

    With sums (batch norm), everything goes over one denominator: the compact closed form.
    Otherwise, of the candidate forms, the one with the fewest operations wins. A form that
    brings in an exponential the expression did not have (``together`` can turn ``exp(-u)``
    into ``1/exp(u)``-style factors) is never taken.
    """
    expr = sp.powsimp(expr, combine="exp")
    if isinstance(expr, sp.Piecewise):
        return expr
    known = expr.atoms(sp.exp)
    candidates = [expr, sp.factor_terms(expr), sp.factor_terms(sp.together(expr))]
    candidates = [c for c in candidates if c.atoms(sp.exp) <= known]
    if expr.has(sp.Sum):  # one fraction over the batch size: N*dy - sum(dy) - ...
        return candidates[-1]
    return min(candidates, key=lambda c: (sp.count_ops(c), candidates.index(c)))


def _stored(form: Forward, vjp: dict[str, Adjoint]) -> tuple[str, ...]:
    arrays = form.arrays
    read: set[str] = set()
    for adjoint in vjp.values():
        for element in _elements(adjoint.expr):
            name = _name(element)
            if name in arrays:
                read.add(name)
    order = list(arrays)
    return tuple(sorted(read, key=order.index))


# -- values computed once for both passes --------------------------------------------------------
#: Functions not worth keeping: comparisons and branches cost a pass like the read of a kept
#: array, and ``exp``/``log`` are printed as ``expm1``/``log1p`` where their surroundings allow,
#: which a kept value would hide.
_CHEAP = (
    sp.Abs,
    sp.sign,
    sp.Heaviside,
    sp.Max,
    sp.Min,
    sp.Piecewise,
    sp.floor,
    sp.ceiling,
    sp.KroneckerDelta,
    sp.exp,
    sp.log,
)


def _costly(node: sp.Expr) -> bool:
    """A function of the layer's arrays that takes more than a pass or two to compute."""
    if isinstance(node, ArrayOp):  # the array nodes of the printed forms
        return isinstance(node, (Sigmoid, Softplus, Erfc))
    return (
        isinstance(node, sp.Function)
        and not isinstance(node, _CHEAP)
        and node.has(sp.Indexed)
        and not node.has(sp.Sum)
    )


def carried_values(derivation: LayerDerivation) -> tuple[Carried, ...]:
    """The costly function values of an element-wise layer that both its forward formula and
    its VJPs compute (in the forms the code prints), outermost first; none for other layers.

    GELU's forward ``x*(1 + erf(x/sqrt(2)))/2`` and its VJP both call ``erf(x/sqrt(2))``: the
    forward pass keeps it (``erf_x``) and the backward reads it. A value is kept only if some
    VJP still reads it once the values kept before it are read instead.
    """
    form = derivation.form
    if not form.elementwise or len(form.stages) != 1:
        return _softmax_values(derivation) or argmax_values(derivation)
    stage = form.output
    upstream = derivation.upstream.name
    forward = stabilize(stage.expr)
    backward = [
        stabilize(computed_form(a.expr, upstream, form.gather)) for a in derivation.vjp.values()
    ]
    nodes = []
    for node in sp.preorder_traversal(forward):
        if _costly(node) and node not in nodes:
            nodes.append(node)
    # outermost first: a value kept is read in place of every value inside it
    nodes = sorted(nodes, key=lambda node: -sum(node.has(other) for other in nodes))
    carried: list[Carried] = []
    taken = set(form.arrays) | {s.name for s in form.constants} | {upstream}
    for node in nodes:
        replaced = [e.xreplace({c.expr: c.array[c.indices] for c in carried}) for e in backward]
        if not any(e.has(node) for e in replaced):
            continue
        name = _carried_name(node, form, taken)
        taken.add(name)
        carried.append(Carried(Array(name, stage.array.dims), stage.indices, node))
    return tuple(carried)


def _softmax_values(derivation: LayerDerivation) -> tuple[Carried, ...]:
    """``exp(v - lse[I])`` read by a VJP, ``lse`` a stage ``log(Sum_k exp(u))`` (softmax
    cross-entropy's ``exp(z[n, c] - lse[n])``, the softmax): kept by the forward pass, which
    computes it from the shifted exponentials it takes for ``lse`` anyway
    (:func:`~symbp.derivation.stable.softmax_form`), instead of from the rounded ``lse``."""
    form = derivation.form
    sums = {s.array.base: s for s in form.stages if log_sum_exp_terms(s.expr) is not None}
    if not sums:
        return ()
    upstream = derivation.upstream.name
    carried: list[Carried] = []
    taken = set(form.arrays) | {s.name for s in form.constants} | {upstream}
    for adjoint in derivation.vjp.values():
        code = stabilize(computed_form(adjoint.expr, upstream, form.gather))
        for node in sp.preorder_traversal(code):
            if not isinstance(node, sp.exp) or any(c.expr == node for c in carried):
                continue
            elements = [e for e in node.atoms(sp.Indexed) if e.base in sums]
            free = {i for i in node.free_symbols if _is_index(i, node)}
            if len(elements) != 1 or free != set(adjoint.indices):
                continue
            (element,) = elements
            if sp.diff(node.args[0], element) != -1:  # exp(v - lse), lse nowhere else
                continue
            inputs = [a.name for a in form.inputs if node.has(a.base)]
            name, count = "softmax_" + "_".join(inputs or ["value"]), 1
            while name in taken:
                count += 1
                name = f"softmax_{'_'.join(inputs or ['value'])}_{count}"
            taken.add(name)
            computed = softmax_form(node, element, sums[element.base])
            array = Array(name, adjoint.array.dims)
            carried.append(Carried(array, adjoint.indices, node, computed))
    return tuple(carried)


def _code_reads(derivation: LayerDerivation) -> tuple[str, ...]:
    """The arrays of ``stored`` that the code's VJPs read (the carried values read instead)."""
    form = derivation.form
    upstream = derivation.upstream.name
    read: set[str] = set()
    for adjoint in [*derivation.through.values(), *derivation.vjp.values()]:
        code = stabilize(computed_form(adjoint.expr, upstream, form.gather))
        code = carried_read(code, derivation.carried)
        read |= {_name(element) for element in _elements(code)}
    return tuple(name for name in derivation.stored if name in read)


def _carried_name(node: sp.Expr, form: Forward, taken: set[str]) -> str:
    """``erf_x`` for ``erf(...x...)``, ``tanh_softplus_x`` for ``tanh(softplus(x))``;
    ``erf_x_2`` for a second ``erf`` of ``x``."""
    functions: list[str] = []
    for part in sp.preorder_traversal(node):
        if isinstance(part, sp.Function):
            functions.append(type(part).__name__.lower())
    inputs = [a.name for a in form.inputs if node.has(a.base)]
    stem = "_".join([*functions[:3], *(inputs or ["value"])])
    name, count = stem, 1
    while name in taken:
        count += 1
        name = f"{stem}_{count}"
    return name


