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

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..declare.forms import Array, Forward, N
from ..declare.net import Net, Placed
from ..derivation.kept import ARGMAX, FULL, read_forms
from ..derivation.plan import build_plan, kept_arrays


@dataclass
class CacheEntry:
    """One array a layer keeps: its name, symbolic dims, element count as a polynomial in N.

    ``shared_with`` names the other cache entry (``relu2.y``) that holds the same array, or
    whose array it is a view of (``conv2.xp``, a zero-padded copy of the same values), in which
    case it adds nothing to the total. ``itemsize``: bytes per element where it is not the
    float type's (1 for a bool step or a small arg-max position)."""

    name: str
    dims: tuple[sp.Expr, ...]
    elements: sp.Expr
    shared_with: str | None = None
    itemsize: int | None = None
    view: bool = False  # read from ``shared_with``'s array (its interior, or reshaped back)


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

    The plan (:func:`~symbp.derivation.plan.plan_kept`) gives each kept array the array of the
    forward pass it is: a step's output is a new array unless its forward is its input itself
    (a reshape, an identity); a step reading several values (a residual block's ``x + F(x)``)
    keeps what its VJP needs, which for a sum is nothing; an array read from another step's
    zero-padded copy is that copy's.
    """
    plan = build_plan(net)
    origin: dict[int, str] = {}  # array token -> the entry that first kept it
    rows: dict[str, LayerMemory] = {step.name: LayerMemory(step.name, []) for step in plan.forward}
    for kept in sorted(plan.kept, key=lambda k: k.view is not None):  # the copies first
        step = plan.step(kept.step)
        form = step.derivation.form
        array = next(a for a in step.derivation.cached if a.name == kept.array)
        held = step.derivation.kept_storage.get(array.name, array)  # a view: its whole array
        sizes = _sizes(step.placed, form)
        elements = sp.expand(sp.Mul(*held.dims).xreplace(sizes))
        label = f"{step.name}.{array.name}"
        source = kept
        if kept.view is not None:  # counted as the array it views
            source = next(e for e in plan.kept if (e.step, e.array) == kept.view)
        key = (source.token, source.padded)
        shared = origin.get(key)
        origin.setdefault(key, label)
        carried = next((c for c in step.derivation.carried if c.array.name == array.name), None)
        itemsize = 1 if carried is not None and carried.dtype in ("bool", "index") else None
        itemsize = 8 if array.integer else itemsize  # ids: NumPy's default integer, int64
        entry = CacheEntry(array.name, array.dims, elements, shared, itemsize,
                           kept.view is not None)
        rows[step.name].entries.append((plan.kept.index(kept), entry))
    for row in rows.values():
        row.entries = [entry for _, entry in sorted(row.entries, key=lambda pair: pair[0])]
    return [rows[item.name] for item in plan.derivation.layers]


def _sizes(item: Placed, form: Forward) -> dict[sp.Symbol, sp.Expr]:
    """The layer's size symbols (``I``, ``O``, ``F``) matched to its placed shapes.

    Arrays whose rank differs from the placed shape (flatten's output) are skipped; the
    hyper-parameters (a convolution's padding) and the size rules (its output height) fill in
    sizes that no placed shape names.
    """
    known: list[tuple[Array, tuple[int, ...]]] = [
        *zip(form.inputs, item.in_shapes, strict=False),  # (a block: its input, once)
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
    # the layer's own values: layers of one math share a derivation, and its form holds the
    # values of the layer derived first (a padding of 2 where this one pads by 1)
    values = item.layer.constant_values()
    sizes.update({s: sp.Integer(values[s.name]) if s.name in values else v
                  for s, v in form.constants.items()})
    for dim, rule in form.size_rules.items():
        sizes.setdefault(dim, rule.xreplace(sizes))
    return sizes


def total_elements(model: list[LayerMemory]) -> sp.Expr:
    """Elements the whole cache keeps, a polynomial in N (each array once)."""
    return sp.expand(sp.Add(*[layer.elements for layer in model]))


def predicted_bytes(model: list[LayerMemory], batch: int, dtype) -> int:
    size = np.dtype(dtype).itemsize
    return sum(
        int(entry.elements.subs(N, batch)) * (entry.itemsize or size)
        for layer in model
        for entry in layer.entries
        if entry.shared_with is None
    )


def measured_bytes(cache: dict) -> int:
    """Bytes of the arrays a generated ``cache`` holds, each distinct array once: a view is
    counted by the array it views (its base), once however many views read it."""
    seen: dict[int, int] = {}
    for entries in cache.values():
        for array in entries:
            while isinstance(array.base, np.ndarray):
                array = array.base
            seen[id(array)] = array.nbytes
    return sum(seen.values())


def measure_cache(net: Net, module, *, batch: int, dtype, seed: int = 0) -> int:
    """Run the generated forward pass (training mode) on a random batch; the cache's bytes."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=dtype)
    x = net.sample_input(rng, batch)  # ids stay integers
    x = x if isinstance(x, dict) else {next(iter(net.inputs)): x}
    x = [a if name in net.ids else a.astype(dtype) for name, a in x.items()]
    _, cache = module.forward(params, *x, train=True, rng=rng)
    return measured_bytes(cache)


def minimum_bytes(net: Net, batch: int, dtype) -> int:
    """The least memory from which the derived backward can run: what its formulas read,
    each array of the forward pass once, in the least bits that determine what is read.

    For each layer, :func:`~symbp.derivation.kept.read_forms` tells how its VJPs read each
    array (parameters aside, the backward reads them where they are): read whole, the array
    costs its elements in the float type (a zero-padded copy only its unpadded values: the
    zeros are known); read only through a step (ReLU's ``step(y)``), one bit an element; read
    only through each window's first arg-max (max pooling), ``ceil(log2(K_h*K_w))`` bits a
    window. An array read in several ways by several layers costs the most of them if one
    reads it whole (the rest follows from it), else the sum of its bits. Not counted: packing
    across arrays, recomputation (keeping less and running part of the forward pass again).
    """
    plan = build_plan(net)
    size = np.dtype(dtype).itemsize
    params = {step.name: {p.name for p in step.derivation.form.params} for step in plan.forward}
    needs: dict[int, dict[str, int]] = {}  # array token -> bits by way of reading
    for kept in kept_arrays(plan, lambda step: [n for n in step.derivation.stored
                                                if n not in params[step.name]]):
        step = plan.step(kept.step)
        form = step.derivation.form
        sizes = _sizes(step.placed, form)
        how = read_forms(step.derivation)[kept.array]
        array = form.inputs[0] if kept.padded else form.arrays[kept.array]
        elements = int(sp.Mul(*array.dims).xreplace(sizes).subs(N, batch))
        if array.integer:  # ids in [0, V): log2(V) bits each
            bits = elements * max(1, math.ceil(math.log2(net.ids[step.inputs[0]])))
        elif how == FULL:
            bits = elements * size * 8
        elif how == ARGMAX:
            windows = form.output.array
            count = int(sp.Mul(*windows.dims).xreplace(sizes).subs(N, batch))
            window = form.output.expr
            positions = int(sp.Mul(*[h - lo + 1 for _, lo, h in window.limits]).xreplace(sizes))
            bits = count * max(1, math.ceil(math.log2(positions)))
        else:
            bits = elements
        ways = needs.setdefault(kept.token, {})
        ways[how] = max(ways.get(how, 0), bits)
    total = 0
    for ways in needs.values():
        bits = ways[FULL] if FULL in ways else sum(ways.values())
        total += math.ceil(bits / 8)
    return total
