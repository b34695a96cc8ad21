"""Gradient flow measured with the generated code: norms, Jacobians, bounds evaluated.

The generated module's ``backward`` returns parameter gradients only. To see the gradient at
every activation, :func:`backward_trace` runs the network plan's backward steps
(:mod:`symbp.derivation.plan`, the steps ``backward`` is printed from) with the module's own
per-layer ``<stem>_backward`` functions, with the same arguments the generated
``backward`` passes (upstream gradient, ``*cache[name]``, the parameters the VJP reads, the
hyper-parameters it uses); the tests check that its parameter gradients equal ``backward``'s.

``cache[name]`` holds, in order, the arrays of ``derivation.stored`` that are not parameters
and then the values carried from the forward pass (``derivation.cached``, :func:`cached_names`):
that is how the generator builds it.

Jacobians are assembled from VJPs with basis vectors (one backward pass per output entry), so
they are only computed for small batches and widths (:data:`JACOBIAN_LIMIT`).
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import weakref
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..checking.gradcheck import input_arrays, load_module, make_inputs
from ..declare.net import Net, Placed
from ..derivation.layer import LayerDerivation
from ..derivation.plan import Plan, Step, Sum, build_plan
from ..emit.module import function_stems, generate_module
from ..emit.network import size_values
from ..naming import backward_function, forward_function
from ..runtime.targets import _one_hot
from .bounds import LayerMax, OperatorNorm

#: Jacobians are built only when every layer's input and output has at most this many entries.
JACOBIAN_LIMIT = 1024


def cached_names(derivation: LayerDerivation) -> list[str]:
    """The names of the arrays in the generated ``cache[layer]`` tuple, in order."""
    return [array.name for array in derivation.cached]


@dataclass
class Trace:
    """Gradients at every layer from one backward pass.

    ``grad_in[name]`` is dL/d(input of the layer), ``grad_out[name]`` dL/d(its output),
    ``grads`` the parameter gradients keyed like the module's (``fc1.W``).
    """

    grad_in: dict[str, np.ndarray] = field(default_factory=dict)
    grad_out: dict[str, np.ndarray] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)


def backward_trace(
    net: Net, module: types.ModuleType, params, cache, dout, layer: str | None = None
) -> Trace:
    """Run the plan's backward steps with the module's functions, recording gradients (with
    ``layer``: only that layer's, a block's body included, from ``dout`` at its output)."""
    trace = Trace()
    plan = plan_for(net)
    stems = function_stems(net)
    entries = plan.backward if layer is None else plan.backward_of(layer)
    values = {entries[0].upstream: dout}
    for entry in entries:
        if isinstance(entry, Sum):
            total = values[entry.parts[0]]
            for part in entry.parts[1:]:
                total = total + values[part]
            values[entry.target] = total
            trace.grad_in[plan.readers[entry.value][-1]] = total  # the block that reads it last
            continue
        step, upstream = entry.step, values[entry.upstream]
        trace.grad_out[step.name] = upstream
        if step.reshape:  # a reshape in the generated code, no function of its own
            result = (upstream.reshape(len(upstream), *step.placed.in_shape),)
        else:
            stem = stems[step.name] + step.stem_suffix  # the form the plan chose to keep
            result = _run_vjp(module, params, cache, step, stem, upstream)
        values.update(zip(entry.produces, result, strict=False))
        trace.grads.update(zip(step.grads, result[len(step.grad_inputs) :], strict=True))
        # (integer ids get no gradient: nan, shown as not measured)
        trace.grad_in[step.name] = result[0] if step.grad_inputs else np.array(math.nan)
    return trace


def _run_vjp(module, params, cache, step: Step, stem: str, upstream) -> tuple:
    """``<stem>_backward`` with the arguments the generated ``backward`` passes."""
    backward = getattr(module, backward_function(stem))
    read = [params[key] for key in step.params_read]
    keywords = step.backward_constants()
    # sizes that no argument's shape tells (e.g. a padded pooling's input height)
    accepted = inspect.signature(backward).parameters
    sizes = size_values(step, step.derivation.form)
    keywords.update({k: v for k, v in sizes.items() if k in accepted})
    result = backward(upstream, *cache[step.name], *read, **keywords)
    return result if len(step.derivation.form.differentiable) > 1 else (result,)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(net: Net) -> Plan:
    """The network's plan, built once per net."""
    if net not in _PLANS:
        _PLANS[net] = build_plan(net)
    return _PLANS[net]


def loss_gradient(net: Net, module: types.ModuleType, out: np.ndarray, y) -> tuple[float, object]:
    """The loss and dL/d(out) with the module's loss functions (as ``loss_and_grads`` does)."""
    stem = function_stems(net)[None]
    target = _one_hot(y, out) if net.loss.target_kind == "labels" else y
    loss, loss_cache = getattr(module, forward_function(stem))(out, target)
    return float(loss), getattr(module, backward_function(stem))(*loss_cache)


# -- bounds at given values ---------------------------------------------------------------------
def layer_arrays(net: Net, name: str, params, cache) -> dict[str, np.ndarray]:
    """A layer's parameters and cached arrays by their names in its formulas."""
    prefix = f"{net.find(name).param_owner or name}."
    arrays = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
    if name in cache:
        derivation = plan_for(net).step(name).derivation  # the form the plan chose to keep
        arrays.update(zip(cached_names(derivation), cache[name], strict=True))
    return arrays


def evaluate_bound(expr: sp.Expr | None, net: Net, params, cache) -> float:
    """A symbolic bound as a number, at the given parameters and forward cache (nan: none)."""
    if expr is None:
        return float("nan")
    values = {}
    for node in expr.atoms(OperatorNorm):
        param, layer = node.args
        owner = net.find(layer.name).param_owner or layer.name  # (a shared parameter's)
        values[node] = sp.Float(np.linalg.norm(params[f"{owner}.{param.name}"], 2), 17)
    for node in expr.atoms(LayerMax):
        inner, layer = node.args
        arrays = layer_arrays(net, layer.name, params, cache)
        values[node] = sp.Float(_max_over_entries(inner, arrays), 17)
    number = expr.xreplace(values)
    return float(number) if number.is_number else float("nan")


def _maximum(*args):
    return functools.reduce(np.maximum, args)


def _max_over_entries(expr: sp.Expr, arrays: dict[str, np.ndarray]) -> float:
    """``max`` of an index expression over all entries, arrays broadcast along shared indices."""
    elements = sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key)
    order: list[sp.Symbol] = []
    for element in elements:
        order += [i for i in element.indices if i not in order]
    symbols, inputs = [], []
    for position, element in enumerate(elements):
        value = np.asarray(arrays[element.base.name], dtype=np.float64)
        axes = [order.index(i) for i in element.indices]
        value = np.transpose(value, np.argsort(axes))
        shape = [1] * len(order)
        for axis, size in zip(sorted(axes), value.shape, strict=True):
            shape[axis] = size
        symbols.append(sp.Symbol(f"_a{position}"))
        inputs.append(value.reshape(shape))
    replaced = expr.xreplace(dict(zip(elements, symbols, strict=True)))
    for symbol in sorted(replaced.free_symbols, key=sp.default_sort_key):
        if symbol.name in arrays and symbol not in symbols:
            symbols.append(symbol)
            inputs.append(np.asarray(arrays[symbol.name], dtype=np.float64))
    function = sp.lambdify(symbols, replaced, modules=[{"Max": _maximum}, "numpy"])
    return float(np.max(function(*inputs)))


# -- Jacobians from VJPs with basis vectors ------------------------------------------------------
def _basis_rows(shape, compute) -> np.ndarray:
    """Rows ``compute(e)`` for every basis vector ``e`` of ``shape``, flattened."""
    count = int(np.prod(shape))
    rows = []
    for entry in range(count):
        basis = np.zeros(count)
        basis[entry] = 1.0
        rows.append(np.ravel(compute(basis.reshape(shape))))
    return np.array(rows)


def singular_extremes(matrix: np.ndarray) -> tuple[float, float]:
    """The largest and smallest singular values (nan where the matrix is not finite: a
    network that computes NaN, e.g. sqrt(x) at x < 0, has no singular values to show)."""
    if not np.isfinite(matrix).all():
        return math.nan, math.nan
    values = np.linalg.svd(matrix, compute_uv=False)
    return float(values[0]), float(values[-1])


def layer_jacobian_matrix(net, module, params, cache, item: Placed, batch: int) -> np.ndarray:
    """``d out / d in`` of one layer (a residual block with its body) at the cached point."""
    shape = (batch, *item.out_shape)

    def vjp(upstream):
        return backward_trace(net, module, params, cache, upstream, item.name).grad_in[item.name]

    return _basis_rows(shape, vjp)


def product_jacobians(net, module, params, cache, batch: int) -> dict[str, np.ndarray]:
    """``d out / d(input of layer)`` for every layer, one backward pass per output entry."""
    rows: dict[str, list[np.ndarray]] = {item.name: [] for item in net.walk()}
    count = int(np.prod((batch, *net.output_shape)))
    for entry in range(count):
        basis = np.zeros(count)
        basis[entry] = 1.0
        trace = backward_trace(net, module, params, cache, basis.reshape(batch, *net.output_shape))
        for name in rows:
            rows[name].append(np.ravel(trace.grad_in[name]))
    return {name: np.array(value) for name, value in rows.items()}


def jacobians_fit(net: Net, batch: int) -> bool:
    sizes = [int(np.prod(s)) for item in net.walk() for s in (item.in_shape, item.out_shape)]
    return batch * max(sizes) <= JACOBIAN_LIMIT


# -- one measurement ----------------------------------------------------------------------------
@dataclass
class Measured:
    """Numbers for one layer at initialization (float64, one random batch)."""

    layer: str
    grad_out: float  # ||dL/d output||_F
    grad_in: float  # ||dL/d input||_F
    param_grads: dict[str, float]  # ||dL/dP||_F per parameter
    bound: float  # the proved bound on ||J_layer||_2 at these values
    product: float  # the proved bound on ||d out / d input||_2 at these values
    # On the (smaller) Jacobian batch: (sigma_max, sigma_min) of J_layer and of d out / d input,
    # and the proved bounds evaluated at that batch's values.
    jacobian: tuple[float, float] | None = None
    chain: tuple[float, float] | None = None
    jacobian_bound: float | None = None
    chain_bound: float | None = None


@dataclass
class Measurement:
    loss: float
    dout: float  # ||dL/d out||_F
    rows: list[Measured]
    batch: int
    jacobian_batch: int | None  # None: skipped (too wide)


def setup(net: Net, *, batch: int, seed: int, module=None):
    """The generated module, its initial parameters and a seeded random batch (float64)."""
    module = module or load_module(generate_module(net))
    _, x, y = make_inputs(net, module, batch=batch, seed=seed)
    params = module.init_params(seed=seed, dtype=np.float64)
    return module, params, x, y


def measure(
    net: Net,
    bounds,
    *,
    batch: int = 32,
    seed: int = 0,
    jacobian_batch: int = 4,
    module=None,
    params=None,
    inputs=None,
) -> Measurement:
    """Gradient norms at initialization, the bounds at those values, and Jacobian extremes.

    ``bounds`` is :func:`~symbp.flow.chain.flow_bounds`'s list. ``params`` overrides the
    initial parameters (the experiments scale them), ``inputs`` the random ``(x, y)`` batch.
    Without a loss, ``dL/d out`` is a random normal array (the gradient of ``sum(out * y)``).
    """
    module, initial, x, y = setup(net, batch=batch, seed=seed, module=module)
    params = initial if params is None else params
    if inputs is not None:
        x, y = inputs
        batch = len(next(iter(input_arrays(net, x).values())))
    arrays = list(input_arrays(net, x).values())
    out, cache = module.forward(params, *arrays, train=True, rng=np.random.default_rng(seed))
    if net.loss is None:
        loss, dout = float(np.sum(out * y)), y
    else:
        loss, dout = loss_gradient(net, module, out, y)
    trace = backward_trace(net, module, params, cache, dout)
    by_name = {row.layer: row for row in bounds}
    rows = []
    for item in net.walk():
        row = by_name[item.name]
        rows.append(
            Measured(
                layer=item.name,
                grad_out=float(np.linalg.norm(trace.grad_out[item.name])),
                grad_in=float(np.linalg.norm(trace.grad_in[item.name])),
                param_grads={
                    key: float(np.linalg.norm(value))
                    for key, value in trace.grads.items()
                    if key.rsplit(".", 1)[0] == item.name
                },
                bound=evaluate_bound(row.bound, net, params, cache),
                product=evaluate_bound(row.product, net, params, cache),
            )
        )
    used_batch = None
    if jacobian_batch and jacobians_fit(net, jacobian_batch):
        used_batch = jacobian_batch
        _, _, xj, _ = setup(net, batch=jacobian_batch, seed=seed + 1, module=module)
        _, jcache = module.forward(params, *input_arrays(net, xj).values(), train=True,
                                   rng=np.random.default_rng(seed))
        chains = product_jacobians(net, module, params, jcache, jacobian_batch)
        for measured, item in zip(rows, net.walk(), strict=True):
            matrix = layer_jacobian_matrix(net, module, params, jcache, item, jacobian_batch)
            measured.jacobian = singular_extremes(matrix)
            measured.chain = singular_extremes(chains[item.name])
            row = by_name[item.name]
            measured.jacobian_bound = evaluate_bound(row.bound, net, params, jcache)
            measured.chain_bound = evaluate_bound(row.product, net, params, jcache)
    return Measurement(loss, float(np.linalg.norm(dout)), rows, batch, used_batch)
