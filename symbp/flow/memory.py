"""What backward keeps from the forward pass: a formula per layer, checked against the cache.

Each layer keeps the arrays of ``derivation.stored`` that are not parameters and the values it
carries from the forward pass to the backward (``derivation.cached``, the generated
``cache[name]``); their sizes are the symbolic dims of the layer's forward definition (``x`` is
``N x I`` for a linear layer), which become numbers times the batch size ``N`` once the layer's
widths are matched to its placed shapes.

Arrays are counted once however many layers keep them: a ReLU keeps its output ``y`` and the
next linear layer keeps its input ``x`` -- the same array. The model follows which array each
name refers to through the network (a layer's input is the array the previous one produced, a
residual body starts from the block's input), so the total is what the ``cache`` really holds:
:func:`measured_bytes` counts each distinct array object of a real cache once, and the tests
check the two agree.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..declare.forms import Array, Forward, N
from ..declare.net import Net, Placed
from ..derivation.plan import INPUT, build_plan


@dataclass
class CacheEntry:
    """One array a layer keeps: its name, symbolic dims, element count as a polynomial in N.

    ``shared_with`` names the earlier cache entry (``relu2.y``) that holds the same array, in
    which case it adds nothing to the total.
    """

    name: str
    dims: tuple[sp.Expr, ...]
    elements: sp.Expr
    shared_with: str | None = None


@dataclass
class LayerMemory:
    layer: str
    entries: list[CacheEntry]

    @property
    def formula(self) -> sp.Expr:
        """Elements kept, in the layer's symbolic sizes (``N*I``), counting shared arrays too."""
        return sp.Add(*[sp.Mul(*e.dims) for e in self.entries])

    @property
    def elements(self) -> sp.Expr:
        """Elements kept, as a polynomial in N, counting only arrays not kept earlier."""
        return sp.Add(*[e.elements for e in self.entries if e.shared_with is None])


def memory_model(net: Net) -> list[LayerMemory]:
    """The cache of ``net``'s generated forward pass, layer by layer (declaration order).

    The plan's forward steps give each value's array: a step's output is a new array unless
    its forward is its input itself (a reshape, an identity); a step reading several values
    (a residual block's ``x + F(x)``) keeps what its VJP needs, which for a sum is nothing.
    """
    counter = itertools.count()
    origin: dict[int, str] = {}  # array token -> the entry that first kept it
    tokens = {INPUT: next(counter)}  # value -> the array it is
    rows: dict[str, LayerMemory] = {}
    plan = build_plan(net)
    for step in plan.forward:
        form = step.derivation.form
        stage = form.output
        token = {form.inputs[0].name: tokens[step.inputs[0]]}
        aliases_input = step.reshape or (
            len(step.inputs) == 1
            and len(stage.indices) == form.inputs[0].rank  # (a pooling reduces the rank)
            and stage.expr == form.inputs[0][stage.indices]
        )
        token[stage.name] = token[form.inputs[0].name] if aliases_input else next(counter)
        tokens[step.output] = token[stage.name]
        sizes = _sizes(step.placed, form)
        entries = []
        for array in step.derivation.cached:
            kept = token.setdefault(array.name, next(counter))
            elements = sp.expand(sp.Mul(*array.dims).xreplace(sizes))
            shared = origin.get(kept)
            origin.setdefault(kept, f"{step.name}.{array.name}")
            entries.append(CacheEntry(array.name, array.dims, elements, shared))
        rows[step.name] = LayerMemory(step.name, entries)
    return [rows[item.name] for item in plan.derivation.layers]


def _sizes(item: Placed, form: Forward) -> dict[sp.Symbol, sp.Expr]:
    """The layer's size symbols (``I``, ``O``, ``F``) matched to its placed shapes.

    Arrays whose rank differs from the placed shape (flatten's output) are skipped; the
    hyper-parameters (a convolution's padding) and the size rules (its output height) fill in
    sizes that no placed shape names.
    """
    known: list[tuple[Array, tuple[int, ...]]] = [
        (form.inputs[0], item.in_shape),
        (form.output.array, item.out_shape),
    ]
    shapes = item.layer.param_shapes(item.in_shape)
    known += [(p, shapes[p.name]) for p in form.params if p.name in shapes]
    sizes: dict[sp.Symbol, sp.Expr] = {}
    for array, shape in known:
        dims = array.dims[1:] if array.dims[:1] == (N,) else array.dims  # per sample
        if len(dims) != len(shape):
            continue
        for dim, value in zip(dims, shape, strict=True):
            if isinstance(dim, sp.Symbol):
                sizes[dim] = sp.Integer(value)
    sizes.update(form.constants)
    for dim, rule in form.size_rules.items():
        sizes.setdefault(dim, rule.xreplace(sizes))
    return sizes


def total_elements(model: list[LayerMemory]) -> sp.Expr:
    """Elements the whole cache keeps, a polynomial in N (each array once)."""
    return sp.expand(sp.Add(*[layer.elements for layer in model]))


def predicted_bytes(model: list[LayerMemory], batch: int, dtype) -> int:
    return int(total_elements(model).subs(N, batch)) * np.dtype(dtype).itemsize


def measured_bytes(cache: dict) -> int:
    """Bytes of the arrays a generated ``cache`` holds, each distinct array object once."""
    seen: dict[int, int] = {}
    for entries in cache.values():
        for array in entries:
            seen[id(array)] = array.nbytes
    return sum(seen.values())


def measure_cache(net: Net, module, *, batch: int, dtype, seed: int = 0) -> int:
    """Run the generated forward pass (training mode) on a random batch; the cache's bytes."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=dtype)
    x = rng.standard_normal((batch, *net.input_shape)).astype(dtype)
    _, cache = module.forward(params, x, train=True, rng=rng)
    return measured_bytes(cache)
