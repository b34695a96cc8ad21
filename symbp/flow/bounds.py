"""Local Jacobians read off the derived VJPs, and the bounds on them the engine can prove.

A layer's VJP ``dx = J^T dy`` is linear in the upstream gradient ``dy``, so its Jacobian is the
coefficient of ``dy`` in the derived formula. Three shapes of Jacobian are recognised, each with
a bound on its spectral norm ``||J||_2`` that follows from the formula itself:

* **diagonal** (element-wise layers, ``dx[n, j] = f'(..) dy[n, j]``): ``||J||_2 = max |f'|``,
  bounded by ``sup_x |f'(x)|``. ``f'`` comes in terms of what the layer keeps (sigmoid:
  ``y*(1 - y)``); substituting the forward definition gives ``f'(x)``, and
  :func:`~symbp.flow.supremum.supremum_abs` maximises it by calculus (sigmoid: 1/4 at 0).
* **matrix** (``dx[n, i] = sum_k W[i, k] dz[n, k]``): per sample ``J = W^T``, so
  ``||J||_2 = ||W||_2``, the largest singular value of the parameter (:class:`OperatorNorm`).
* **projection** (batch norm, ``dx = c (dy - sum_k g_k <g_k, dy> / N)`` per feature): if the
  ``g_k`` are pairwise orthogonal and ``|g_k|^2 / N <= 2`` -- both checked with the sum
  identities the engine proved from the forward definitions (``sum_m xhat[m, j] = 0``,
  ``sum_m xhat[m, j]**2 = N (1 - eps invstd[j]**2)``) -- then ``I - G G^T / N`` has
  eigenvalues ``1`` and ``1 - |g_k|^2 / N`` in [-1, 1], so ``||J||_2 <= max_j |c_j|`` (batch
  norm: ``|gamma[j]| invstd[j]``).

A residual block ``y = x + F(x)`` has ``J = I + J_F`` and the bound ``1 + ||J_F||``. Anything
else gets no bound (``None``), stated as such.

Bounds that depend on values (weights, batch statistics, learned slopes) are wrapped per layer in
:class:`OperatorNorm` or :class:`LayerMax`, so that a product over a network keeps each layer's
factor apart and :mod:`symbp.flow.numeric` can evaluate it at given parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..declare.forms import Forward
from ..declare.layers import Layer, X, exact
from ..derivation.budget import MAX_POWER, too_costly
from ..derivation.indexing import simplify_indexed
from ..derivation.layer import LayerDerivation, adjoint_array, apply_rules, bound_names
from ..derivation.reshape import is_reshape
from ..emit.latex_names import _letter
from .supremum import Supremum, supremum_abs

#: where an unproved derivative is sampled, for display only
SAMPLE_RANGE = 50


def _latex_name(text: str) -> str:
    return r"\mathrm{" + text.replace("_", r"\_") + "}"


class OperatorNorm(sp.Function):
    """``||W||_2`` (largest singular value) of parameter ``W`` of layer ``L``: ``(W, L)``."""

    nargs = 2
    is_real = True
    is_nonnegative = True

    def _sympystr(self, printer):
        param, layer = self.args
        return f"||{layer.name}.{param.name}||_2"

    def _latex(self, printer, *args, exp=None):
        param, layer = self.args
        name = _letter(param.name, grouped=True)  # (W_{ih})_{rnn}: no double subscript
        norm = rf"\lVert {name}_{{{_latex_name(layer.name)}}} \rVert_2"
        return norm if exp is None else f"{norm}^{{{exp}}}"


class LayerMax(sp.Function):
    """The largest value of ``expr`` over the entries of layer ``L``'s arrays: ``(expr, L)``.

    ``LayerMax(Abs(gamma[j])*invstd[j], bn1)`` is ``max_j |gamma_j| invstd_j`` of layer bn1.
    """

    nargs = 2
    is_real = True

    def _sympystr(self, printer):
        expr, layer = self.args
        return f"max_{layer.name}({printer._print(expr)})"

    def _latex(self, printer, *args):
        expr, layer = self.args
        indices = sorted({str(i) for e in expr.atoms(sp.Indexed) for i in e.indices}, key=str)
        under = ",".join(indices)
        return (
            rf"\max_{{{under}}}^{{{_latex_name(layer.name)}}} \left({printer._print(expr)}\right)"
            if under
            else rf"\left.{printer._print(expr)}\right|_{{{_latex_name(layer.name)}}}"
        )


@dataclass
class LocalJacobian:
    """The Jacobian of one layer's output with respect to its input, and its proved bound.

    ``entry`` is ``(lhs, rhs)``: ``d out[...] / d in[...]`` and its value from the derived VJP
    (Kronecker deltas for the indices it is diagonal in). ``structure`` is ``diagonal``,
    ``matrix``, ``projection``, ``permutation`` (a reshape), ``sum`` (residual) or ``other``.
    For element-wise layers
    ``derivative`` is ``f'`` in the kept arrays and ``derivative_x`` the same in :data:`X`.
    ``bound_general`` keeps hyper-parameters as symbols (leaky ReLU: ``Max(1, slope)``), ``bound``
    has their values; both ``None`` when no bound was found. ``reason`` says how it was proved
    (or why not), in one line.
    """

    kind: str
    structure: str
    entry: tuple[sp.Expr, sp.Expr]
    bound: sp.Expr | None
    bound_general: sp.Expr | None
    reason: str
    derivative: sp.Expr | None = None
    derivative_x: sp.Expr | None = None
    supremum: Supremum | None = None
    #: residual blocks: the factor on the body's Jacobian (``J = skip I + body_scale J_F``)
    body_scale: sp.Expr | None = None


#: what a layer shape this analysis does not know can raise while being classified
_UNSUPPORTED = (
    ArithmeticError,
    AttributeError,
    IndexError,
    KeyError,
    NotImplementedError,
    TypeError,
    ValueError,
)


def local_jacobian(layer: Layer, derivation: LayerDerivation, name: str) -> LocalJacobian:
    """Classify ``layer``'s derived Jacobian and bound its spectral norm (see module doc).

    A layer whose Jacobian has none of the recognised shapes gets no bound (``structure``
    ``other``), never an exception; ``entry`` is ``None`` if it cannot even be read off.
    """
    try:
        entry = jacobian_entry(derivation)
    except _UNSUPPORTED:
        entry = None
    try:
        return _classify(layer, derivation, entry, name)
    except _UNSUPPORTED as err:
        reason = f"no bound found (not a shape this analysis knows: {type(err).__name__})"
        return LocalJacobian(layer.kind, "other", entry, None, None, reason)


def _classify(layer: Layer, derivation: LayerDerivation, entry, name: str) -> LocalJacobian:
    form = derivation.form
    if len(form.inputs) == 2:  # y = a x + b f (a residual block's sum)
        return _residual(layer, derivation, entry)
    if is_reshape(derivation):  # J moves every entry to one place: a permutation
        reason = "a reshape: J permutes the entries, so ||J||_2 = 1"
        one = sp.Integer(1)
        return LocalJacobian(layer.kind, "permutation", entry, one, one, reason)
    if len(form.inputs) != 1:
        return LocalJacobian(layer.kind, "other", entry, None, None, "no bound found")
    if form.inputs[0].integer:
        return LocalJacobian(layer.kind, "other", entry, None, None,
                             "no bound found: its input is integer ids, which get no gradient")
    vjp = derivation.vjp[form.inputs[0].name]
    upstream = adjoint_array(form.output.array)
    element = upstream[vjp.indices] if upstream.dims == form.inputs[0].dims else None
    if form.elementwise and element is not None:
        return _diagonal(layer, derivation, entry, element, name)
    matrix = _matrix(derivation, entry, name)
    if matrix is not None:
        return matrix
    projection = _projection(layer, derivation, entry, name)
    if projection is not None:
        return projection
    return LocalJacobian(layer.kind, "other", entry, None, None, "no bound found")


def jacobian_entry(derivation: LayerDerivation) -> tuple[sp.Expr, sp.Expr]:
    """``(d out[o] / d in[i], value)``: the coefficient of ``dy[o]`` in the derived ``dx[i]``."""
    form = derivation.form
    names = bound_names(form)
    source = form.inputs[0]
    vjp = derivation.vjp[source.name]
    output = form.output.array
    # not the name of an index summed over in dx either: d/d dy[n, k'] of sum_k'(dy[n, k'] ...)
    # would differentiate the bound k' as if it were the free one
    taken = {i.name for i in vjp.indices} | {s.name for s in vjp.expr.atoms(sp.Symbol)}
    out_indices = []
    for index in form.indices_for(output):
        name = index.name
        while name in taken:
            name += "'"
        taken.add(name)
        out_indices.append(sp.Symbol(name, integer=True))
    upstream = adjoint_array(output)[tuple(out_indices)]
    value = sp.factor_terms(simplify_indexed(sp.diff(vjp.expr, upstream), names))
    lhs = sp.Derivative(output[tuple(out_indices)], source[vjp.indices], evaluate=False)
    return lhs, value


# -- diagonal: element-wise layers -------------------------------------------------------------
def _diagonal(layer, derivation: LayerDerivation, entry, element, name: str) -> LocalJacobian:
    form = derivation.form
    vjp = derivation.vjp[form.inputs[0].name]
    coefficient = sp.diff(vjp.expr, element)
    at_zero = vjp.expr.subs(element, 0)
    if coefficient.has(element.base) or (
        at_zero != 0 and (too_costly(at_zero) or sp.simplify(at_zero) != 0)
    ):
        return LocalJacobian(layer.kind, "other", entry, None, None, "VJP not linear in dy")
    in_x, arrays = _in_scalar_variable(coefficient, form, vjp.indices)
    costly = in_x is not None and too_costly(in_x)  # no closed form sought: see budget.py
    found = supremum_abs(in_x, X) if in_x is not None and not costly else None
    derivative_x = sp.simplify(in_x) if in_x is not None and not costly else in_x
    if found is None or not found.bounded:
        reason = "unbounded" if found is not None else "no bound found (sympy cannot settle sup)"
        if costly:
            reason = f"no bound sought (a power beyond {MAX_POWER}: sympy's work grows with it)"
        sampled = _sampled_sup(in_x, layer) if found is None and in_x is not None else None
        if sampled is not None:
            reason += f"; sampled max |f'| = {sampled:.6g} on [-{SAMPLE_RANGE}, {SAMPLE_RANGE}]"
        return LocalJacobian(
            layer.kind, "diagonal", entry, None, None, reason, coefficient, derivative_x, found
        )
    general = found.value
    values = layer.constant_values()
    constants = {symbol: exact(values[symbol.name]) for symbol in form.constants}
    specific = sp.simplify(general.xreplace(constants))
    reason = _supremum_reason(found)
    ranged = _over_ranges(layer, arrays, general, specific, constants)
    if ranged is not None:  # every entry lies in a declared range (RReLU's slopes)
        general, specific, spans = ranged
        reason += f", at most {sp.sstr(specific)} for {spans}"
        arrays = {}
    if arrays:  # a learned or random slope: the bound is a maximum over its entries
        restore = {symbol: value for symbol, value in arrays.items()}
        general = LayerMax(general.xreplace(restore), sp.Symbol(name))
        specific = LayerMax(specific.xreplace(restore), sp.Symbol(name))
    return LocalJacobian(
        layer.kind, "diagonal", entry, specific, general, reason, coefficient, derivative_x, found
    )


def _over_ranges(layer, arrays, general, specific, constants):
    """The bound's largest value over the declared ranges of its per-entry symbols
    (:meth:`~symbp.declare.layers.Layer.aux_ranges`: RReLU's ``r`` in ``[lower, upper]``), as
    ``(general, specific, text)``; None where a symbol has no range or the largest value is not
    settled (sympy's interval arithmetic, with a ``Max`` of a range read at its top)."""
    if not arrays:
        return None
    spans = layer.aux_ranges()
    if any(symbol.name not in spans for symbol in arrays):
        return None
    ranges = {symbol: sp.AccumBounds(*spans[symbol.name]) for symbol in arrays}
    general = _top(general.xreplace(ranges))
    specific = _top(specific.xreplace({s: r.xreplace(constants) for s, r in ranges.items()}))
    if general is None or specific is None or not specific.is_number:
        return None
    text = ", ".join(
        f"{symbol.name} in [{sp.sstr(spans[symbol.name][0])}, {sp.sstr(spans[symbol.name][1])}]"
        for symbol in arrays
    )
    return general, specific, text


def _top(expr: sp.Expr) -> sp.Expr | None:
    """The largest value of ``expr``, a function of ranges (``AccumBounds``): a range by its top;
    a ``Max`` of a range by the ``Max`` of its top, as ``Max`` grows with each argument; None
    where a range sits anywhere else."""
    if isinstance(expr, sp.AccumBounds):
        return expr.max
    expr = expr.replace(  # |range| (sympy leaves it): at most the larger end's magnitude
        lambda e: isinstance(e, sp.Abs) and isinstance(e.args[0], sp.AccumBounds),
        lambda e: sp.Max(sp.Abs(e.args[0].min), sp.Abs(e.args[0].max)),
    )
    expr = expr.replace(
        lambda e: isinstance(e, sp.Max),
        lambda e: sp.Max(*[a.max if isinstance(a, sp.AccumBounds) else a for a in e.args]),
    )
    return None if expr.has(sp.AccumBounds) else expr


def _in_scalar_variable(coefficient: sp.Expr, form: Forward, indices):
    """``f'`` with kept outputs replaced by their definitions and ``x[idx]`` by :data:`X`.

    Other arrays (PReLU's ``alpha``, RReLU's ``r``) become plain symbols with the same
    assumptions; the returned map turns them back into array elements.
    """
    stage = form.output
    source = form.inputs[0]
    mapping = dict(zip(stage.indices, indices, strict=True))
    expr = coefficient.xreplace({stage.array[indices]: stage.expr.xreplace(mapping)})
    expr = expr.xreplace({source[indices]: X})
    arrays: dict[sp.Symbol, sp.Expr] = {}
    indexed = expr.atoms(sp.Indexed)
    labels = {e.base.label for e in indexed}
    scalars = {a.name for a in form.params + form.aux if not a.dims}
    for element in indexed | {
        s for s in expr.free_symbols if s.name in scalars and s not in labels
    }:
        base = element.base if isinstance(element, sp.Indexed) else element
        array = form.arrays.get(base.name)
        if array is None:
            return None, {}
        symbol = sp.Symbol(base.name, real=True, positive=array.positive or None)
        arrays[symbol] = element
    expr = expr.xreplace({element: symbol for symbol, element in arrays.items()})
    if expr.atoms(sp.Indexed):
        return None, {}
    return expr, arrays


def _sampled_sup(expr: sp.Expr, layer: Layer) -> float | None:
    """``max |f'|`` on a fine grid: shown where no bound was proved, never used as one."""
    values = layer.constant_values()
    expr = expr.xreplace({s: exact(values[s.name]) for s in expr.free_symbols if s.name in values})
    if expr.free_symbols - {X}:
        return None
    grid = np.linspace(-SAMPLE_RANGE, SAMPLE_RANGE, 400_001)
    with np.errstate(all="ignore"):
        sampled = np.abs(np.broadcast_to(sp.lambdify(X, expr, "numpy")(grid), grid.shape))
    return float(np.nanmax(sampled)) if np.isfinite(sampled).any() else None


def _supremum_reason(found: Supremum) -> str:
    text = f"sup|f'| = {sp.sstr(found.value)}"
    if found.values is not None:
        text = f"f' in {_set_text(found.values)}, " + text
    if found.where is None:
        return text + " (over the branches)"
    if found.attained:
        return text + f", attained at x = {sp.sstr(found.where)}"
    return text + f", approached as x -> {sp.sstr(found.where)}"


def _set_text(values: sp.FiniteSet) -> str:
    return "{" + ", ".join(sp.sstr(v) for v in sorted(values, key=sp.default_sort_key)) + "}"


# -- matrix: dx = dz W^T ------------------------------------------------------------------------
def _matrix(derivation: LayerDerivation, entry, name: str) -> LocalJacobian | None:
    form = derivation.form
    vjp = derivation.vjp[form.inputs[0].name]
    upstream = adjoint_array(form.output.array)
    expr = vjp.expr
    if not isinstance(expr, sp.Sum) or len(expr.limits) != 1:
        return None
    k = expr.limits[0][0]
    factors = sp.Mul.make_args(expr.function)
    dz = [f for f in factors if isinstance(f, sp.Indexed) and f.base == upstream.base]
    rest = [f for f in factors if f not in dz]
    if len(dz) != 1 or len(rest) != 1 or not isinstance(rest[0], sp.Indexed):
        return None
    weight = rest[0]
    params = {p.name: p for p in form.params}
    if weight.base.name not in params or k not in weight.indices or k not in dz[0].indices:
        return None
    # The batch index passes through untouched: one matrix per sample.
    if [i for i in dz[0].indices if i != k] != [i for i in vjp.indices if i not in weight.indices]:
        return None
    norm = OperatorNorm(sp.Symbol(weight.base.name), sp.Symbol(name))
    return LocalJacobian(
        form.output.name,
        "matrix",
        entry,
        norm,
        norm,
        f"J = {weight.base.name}^T per sample: ||J||_2 = ||{weight.base.name}||_2",
    )


# -- projection: batch norm ---------------------------------------------------------------------
def _projection(layer, derivation: LayerDerivation, entry, name: str) -> LocalJacobian | None:
    form = derivation.form
    vjp = derivation.vjp[form.inputs[0].name]
    upstream = adjoint_array(form.output.array)
    if upstream.dims != form.inputs[0].dims:
        return None
    dy = upstream[vjp.indices]
    expr = sp.expand(vjp.expr)
    scale = expr.coeff(dy)
    sums = sorted({s for s in expr.atoms(sp.Sum) if s.has(upstream.base)}, key=sp.default_sort_key)
    if not sums or scale == 0 or scale.has(upstream.base):
        return None
    directions: list[tuple[sp.Expr, sp.Symbol, sp.Expr]] = []  # (g[m], m, size)
    remainder = expr - scale * dy
    for total in sums:
        if len(total.limits) != 1:
            return None
        m, low, high = total.limits[0]
        weight = sp.cancel(total.function / dy.xreplace(_batch_rename(vjp.indices, m, form)))
        coefficient = expr.coeff(total)
        if weight.has(upstream.base) or coefficient.has(upstream.base) or low != 0:
            return None
        size = high + 1
        n = _batch_index(vjp.indices, form)
        if n is None or sp.simplify(coefficient + scale * weight.xreplace({m: n}) / size) != 0:
            return None
        directions.append((weight, m, size))
        remainder -= coefficient * total
    if sp.simplify(remainder) != 0:
        return None
    for position, (g, m, size) in enumerate(directions):
        for h, m2, _ in directions[position:]:
            gram = _reduce_sum(g * h.xreplace({m2: m}), m, size, derivation) / size
            if h is g:
                if not g.is_real or (2 - gram).is_nonnegative is not True:
                    return None
            elif sp.simplify(gram) != 0:
                return None
    bound = sp.Abs(scale)
    arrays_bound = LayerMax(bound, sp.Symbol(name))
    return LocalJacobian(
        layer.kind,
        "projection",
        entry,
        arrays_bound,
        arrays_bound,
        f"J = c (I - G G^T/N) per feature, G's {len(directions)} columns orthogonal "
        f"with |g|^2/N <= 2 (proved identities): ||J||_2 <= |c| = {sp.sstr(bound)}",
    )


def _batch_index(indices, form: Forward):
    dims = form.inputs[0].dims
    for index, dim in zip(indices, dims, strict=True):
        if dim.name == "N":
            return index
    return None


def _batch_rename(indices, m, form: Forward) -> dict:
    n = _batch_index(indices, form)
    return {} if n is None else {n: m}


def _reduce_sum(body: sp.Expr, m: sp.Symbol, size: sp.Expr, derivation: LayerDerivation):
    """``sum_m body`` reduced with the identities the engine proved for this layer."""
    body = sp.expand(body)
    total = sp.Integer(0)
    for term in sp.Add.make_args(body):
        if not term.has(m):
            total += term * size
            continue
        total += apply_rules(sp.Sum(term, (m, 0, size - 1)), derivation.identities)
    return sp.simplify(simplify_indexed(total))


# -- residual -----------------------------------------------------------------------------------
def _residual(layer: Layer, derivation: LayerDerivation, entry) -> LocalJacobian:
    coefficients = []
    for source in derivation.form.inputs:
        vjp = derivation.vjp[source.name]
        dy = adjoint_array(derivation.form.output.array)[vjp.indices]
        coefficients.append(sp.diff(vjp.expr, dy))
    if any(c.free_symbols for c in coefficients):
        return LocalJacobian(layer.kind, "other", entry, None, None, "no bound found")
    skip, body = (sp.Abs(c) for c in coefficients)
    return LocalJacobian(
        layer.kind,
        "sum",
        entry,
        skip,  # the skip's share; the body's product is added by the network bound
        skip,
        f"J = {sp.sstr(coefficients[0])} I + {sp.sstr(coefficients[1])} J_body: "
        f"||J||_2 <= {sp.sstr(skip)} + {sp.sstr(body)} ||J_body||_2",
        body_scale=body,
    )
