"""Bounds on the products of Jacobians down a network: how far a gradient can grow or shrink.

The gradient with respect to the input of layer ``l`` is ``J_l^T ... J_L^T dout`` (chain rule),
so ``||dL/dh_l|| <= (prod_{k >= l} ||J_k||_2) ||dL/dout||``. Each factor is the bound that
:func:`~symbp.flow.bounds.local_jacobian` proved; a residual block contributes the factor
``skip + body_scale * prod(body)``. The product is symbolic: sigmoid layers give exact powers of
1/4, linear layers their ``||W||_2``, batch norm ``max_j |gamma_j| invstd_j``.

:func:`flow_bounds` is the entry point for printing and for the notes exporter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy as sp

from ..declare.layers import Layer
from ..declare.net import Placed
from ..derivation.layer import LayerDerivation
from ..derivation.network import NetworkDerivation
from ..derivation.plan import Plan, Sum, build_plan
from .bounds import LocalJacobian, local_jacobian
from .recurrent import recurrent_bound

_PLACEHOLDER = sp.Symbol("_layer")
_CACHE: dict[tuple, LocalJacobian] = {}


@dataclass
class FlowBound:
    """One layer's row of the symbolic gradient-flow analysis.

    ``jacobian`` is ``(lhs, rhs)``, ``d out[...] / d in[...] = value`` from the derived VJP;
    ``derivative`` is ``f'(x)`` for element-wise layers (else ``None``); ``bound`` bounds
    ``||J_layer||_2`` (``None``: no bound found), ``bound_general`` the same with
    hyper-parameters as symbols; ``product`` bounds ``||d out / d input||_2`` from this layer to
    the network's output; ``reason`` says in one line how the bound was proved; ``depth`` is 1
    inside a residual body. Values that depend on parameters or data appear as
    :class:`~symbp.flow.bounds.OperatorNorm` and :class:`~symbp.flow.bounds.LayerMax`, which
    print as ``||fc1.W||_2`` and ``max_bn1(...)`` (and in LaTeX as norms and maxima).
    """

    layer: str
    kind: str
    structure: str
    jacobian: tuple[sp.Expr, sp.Expr]
    derivative: sp.Expr | None
    bound: sp.Expr | None
    bound_general: sp.Expr | None
    product: sp.Expr | None
    reason: str
    depth: int = 0


def layer_jacobian(layer: Layer, derivation: LayerDerivation, name: str) -> LocalJacobian:
    """:func:`~symbp.flow.bounds.local_jacobian`, computed once per layer math and constants."""
    key = (layer.kind, repr(derivation.form.stages), tuple(sorted(layer.constant_values().items())))
    if key not in _CACHE:
        _CACHE[key] = local_jacobian(layer, derivation, _PLACEHOLDER.name)
    found = _CACHE[key]
    rename = {_PLACEHOLDER: sp.Symbol(name)}

    def named(expr):
        return None if expr is None else expr.xreplace(rename)

    return dataclasses.replace(
        found, bound=named(found.bound), bound_general=named(found.bound_general)
    )


def unrolled_jacobian(item) -> LocalJacobian:
    """A layer unrolled over time: its Jacobian's bound from its cell's stages
    (:func:`~symbp.flow.recurrent.recurrent_bound`)."""
    found = recurrent_bound(item)
    bound = found.layer_bound
    reason = ("no bound found: " if bound is None else
              f"d out/d x_t <= {sp.sstr(found.step_input)} * "
              f"({sp.sstr(found.per_step)})**(T-t) over the T = {found.steps} steps, summed; ")
    reason += "; ".join(found.reasons())
    return LocalJacobian(item.layer.kind, "recurrent", None, bound, bound, reason)


def flow_bounds(derivation: NetworkDerivation) -> list[FlowBound]:
    """The symbolic flow analysis of a network: one :class:`FlowBound` per layer.

    Rows come in the order of ``derivation.layers`` (forward order, a residual block before
    its body). ``product`` of the first row bounds how much the whole network can amplify a
    gradient on its way to the input. Example::

        rows = flow_bounds(symbp.derive(net))
        rows[1].bound      # 1/4 for a sigmoid
        rows[0].product    # (1/4)**8 * ||fc1.W||_2 * ... for eight sigmoid blocks
    """
    jacobians = {
        item.name: layer_jacobian(item.layer, item.derivation, item.name)
        if item.derivation.cell is None else unrolled_jacobian(item)
        for item in derivation.layers
    }
    products: dict[str, sp.Expr | None] = {}
    plan = build_plan(derivation.net, derivation)
    _down(plan, jacobians, products)
    rows = []
    depths = {step.name: step.depth for step in plan.forward}
    for item in derivation.layers:
        jac = jacobians[item.name]
        rows.append(
            FlowBound(
                layer=item.name,
                kind=item.layer.kind,
                structure=jac.structure,
                jacobian=jac.entry,
                derivative=jac.derivative_x,
                bound=_block_bound(item.placed, jacobians),
                bound_general=jac.bound_general
                if jac.structure != "sum"
                else _block_bound(item.placed, jacobians, general=True),
                product=products.get(item.name),
                reason=jac.reason,
                depth=depths[item.name],
            )
        )
    return rows


def _down(plan: Plan, jacobians, products) -> None:
    """Fill ``products`` by running the plan's backward steps on bounds instead of arrays.

    A block's product is ``above * (skip + body_scale * prod(body))``: one factor per block, so
    the expression grows linearly with depth (the expanded sum ``above * skip + [body's
    chain]`` would repeat ``above`` and double per block).
    """
    bounds: dict[str, sp.Expr | None] = {"dout": sp.Integer(1)}
    above: dict[str, sp.Expr | None] = {}  # a fan-out value -> the bound at its block's output
    for entry in plan.backward:
        if isinstance(entry, Sum) and entry.value not in above:  # a graph's fan-out
            parts = [bounds.get(part) for part in entry.parts]
            known = all(part is not None for part in parts)
            bounds[entry.target] = sp.Add(*parts) if known else None  # the triangle inequality
            continue
        if isinstance(entry, Sum):
            block = plan.step(plan.readers[entry.value][-1])
            current, factor = above[entry.value], _block_bound(block.placed, jacobians)
            bounds[entry.target] = None if current is None or factor is None else current * factor
            products[block.name] = bounds[entry.target]
            continue
        step, current = entry.step, bounds[entry.upstream]
        jac = jacobians[step.name]
        if len(step.inputs) > 1 and not step.placed.body:  # reading several: not bounded here
            bounds.update(dict.fromkeys(entry.produces))
            continue
        if len(step.inputs) > 1:  # a block: the body gets ``above * body_scale``
            above[step.inputs[0]] = current
            known = current is not None and jac.bound is not None
            bounds[entry.produces[1]] = current * jac.body_scale if known else None
            continue
        bound = jac.bound
        if not entry.produces:  # integer ids: nothing flows below
            products[step.name] = None
            continue
        bounds[entry.produces[0]] = None if current is None or bound is None else current * bound
        products[step.name] = bounds[entry.produces[0]]


def _block_bound(placed: Placed, jacobians, *, general: bool = False) -> sp.Expr | None:
    """A layer's own bound; for a residual block ``skip + body_scale * prod(body bounds)``."""
    jac = jacobians[placed.name]
    own = jac.bound_general if general else jac.bound
    if not placed.body:
        return own
    body = sp.Integer(1)
    for item in placed.body:
        factor = _block_bound(item, jacobians, general=general)
        if factor is None or own is None:
            return None
        body *= factor
    return own + jac.body_scale * body
