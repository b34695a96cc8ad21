"""Gradient flow through time: the proved bound on ``||d h_T / d h_t||`` of a layer unrolled
over time, the measured norms over t, and what backpropagation through time keeps.

The bound comes from the cell's derivation, not from a formula typed for a cell. Each stage of
the cell (``a = x W_ih^T + h W_hh^T + b``, ``h_new = tanh(a)``) is one edge per array it reads;
the engine derives the stage alone as a layer of that input (:func:`stage_form`,
:func:`~symbp.derivation.layer.derive_layer`), and :func:`~symbp.flow.bounds.local_jacobian`
bounds it as it bounds any layer: ``a <- h`` is a matrix, ``||W_hh||_2``; ``h_new <- a`` is
element-wise, ``sup |tanh'| = 1`` proved by calculus. Summing over the paths from each state
``s`` to each next state ``s_new`` the products of their edges' bounds (the chain rule and the
triangle inequality) gives ``M[s_new, s] >= ||d s_new / d s||_2`` for one step, and, since the
steps share the weights, ``||dL/dh_t|| <= [(M^T)^(T-t)]_{h,h} ||dL/dh_T||`` for the gradient
that reaches ``h_t`` from ``h_T``: for the tanh cell ``||W_hh||_2^(T-t)``.

The measured norms come from the generated module's own cell backward, run from ``dL/dh_T``
over the steps (:func:`state_gradients`), as its layer backward runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..declare.forms import Forward, Stage
from ..declare.forms import N as N_SIZE
from ..derivation.layer import LayerDerivation, derive_layer
from ..derivation.network import DerivedLayer
from .bounds import LocalJacobian, local_jacobian

#: the lag ``T - t`` of the bound, printed in its formula
LAG = sp.Symbol("T", integer=True, positive=True) - sp.Symbol("t", integer=True, positive=True)
_EDGES: dict[tuple, dict[tuple[str, str], LocalJacobian]] = {}


@dataclass
class RecurrentBound:
    """The proved flow of one layer unrolled over time (``layer``, ``steps`` = T).

    ``states`` are the cell's state names (``h``), ``output`` the one the layer outputs;
    ``transition[i][j]`` bounds ``||d new_i / d state_j||_2`` for one step (``None``: no bound
    found); ``step_input`` bounds ``||d out_new / d x_t||_2`` of the step's input; ``edges`` are
    the stages' bounds as ``(stage, source, LocalJacobian)``, each proved by
    :func:`~symbp.flow.bounds.local_jacobian` on the derived stage."""

    layer: str
    kind: str
    steps: int
    states: tuple[str, ...]
    output: str
    transition: list[list[sp.Expr | None]]
    step_input: sp.Expr | None
    edges: list[tuple[str, str, LocalJacobian]] = field(default_factory=list)
    several_parts: bool = False

    @property
    def per_step(self) -> sp.Expr | None:
        """``||d h_T / d h_t||_2 <= per_step ** (T - t)`` (one state: its own bound)."""
        return self.transition[0][0] if len(self.states) == 1 else None

    def lag_bound(self, lag: int, values: dict | None = None) -> sp.Expr | None:
        """The bound on ``||d h_T / d h_{T-lag}||_2``: ``[(M^T)^lag]`` at the output state,
        with ``values`` substituted (a number) or symbolic."""
        if any(entry is None for row in self.transition for entry in row):
            return None
        matrix = sp.Matrix(self.transition).xreplace(values or {})
        at = self.states.index(self.output)
        return sp.simplify((matrix.T ** lag)[at, at])

    @property
    def layer_bound(self) -> sp.Expr | None:
        """A bound on the layer's whole Jacobian ``d out / d x`` (all steps): each block
        ``d h_s / d x_t`` is at most ``step_input * m^(s-t)``, and a block-triangular matrix's
        norm is at most its largest block row sum, ``step_input * sum_k m^k``, k < T."""
        m = self.per_step
        if m is None or self.step_input is None:
            return None
        k = sp.Symbol("k", integer=True, nonnegative=True)
        return self.step_input * sp.Sum(m**k, (k, 0, self.steps - 1))

    def reasons(self) -> list[str]:
        return [f"{stage} <- {source}: {jac.reason}" for stage, source, jac in self.edges]


def stage_form(form: Forward, stage: Stage, source: str) -> Forward:
    """The cell's ``stage`` as a layer of one input, ``source`` (an input or an earlier
    stage); the parameters it reads stay parameters, the other arrays it reads are held
    fixed (``aux``): its derived VJP is the edge ``stage <- source`` of the chain rule."""
    read = {e.base.name for e in stage.expr.atoms(sp.Indexed)}
    arrays = form.arrays
    params = tuple(p for p in form.params if p.name in read)
    names = {p.name for p in params} | {source}
    aux = tuple(arrays[name] for name in sorted(read - names))
    source_array = arrays[source]
    reads = {e for e in stage.expr.atoms(sp.Indexed) if e.base.name == source}
    elementwise = (source_array.dims == stage.array.dims
                   and reads == {source_array[stage.indices]})
    return Forward(inputs=(source_array,), params=params, stages=(stage,), aux=aux,
                   constants=form.constants, letters=form.letters, elementwise=elementwise)


def stage_edges(cell_layer, cell: LayerDerivation, name: str):
    """Every ``(stage, source)`` edge of the cell with its proved bound (cached per cell)."""
    key = (cell_layer.kind, repr(cell.form.stages), name)
    if key not in _EDGES:
        form = cell.form
        edges = {}
        earlier = {a.name for a in form.inputs}
        for stage in form.stages:
            read = {e.base.name for e in stage.expr.atoms(sp.Indexed)} & earlier
            for source in sorted(read):
                sub = stage_form(form, stage, source)
                if sub.elementwise and sub.aux:  # f'(several arrays): sup not sought
                    edges[(stage.name, source)] = LocalJacobian(
                        cell_layer.kind, "other", None, None, None,
                        "no bound sought: an element-wise product with other arrays of the "
                        f"step ({', '.join(a.name for a in sub.aux)})")
                    continue
                edges[(stage.name, source)] = local_jacobian(cell_layer, derive_layer(sub), name)
            earlier.add(stage.name)
        _EDGES[key] = edges
    return _EDGES[key]


def _reach(form: Forward, edges, start: str) -> dict[str, sp.Expr | None]:
    """For every stage: the sum over the paths from ``start`` of the products of the edges'
    bounds (``None`` where an edge on some path has none)."""
    bound: dict[str, sp.Expr | None] = {start: sp.Integer(1)}
    for stage in form.stages:
        total: sp.Expr | None = sp.Integer(0)
        for (target, source), jac in edges.items():
            if target != stage.name or source not in bound:
                continue
            if total is None or bound[source] is None or jac.bound is None:
                total = None
                continue
            total += jac.bound * bound[source]
        if total is None or total != 0:
            bound[stage.name] = total
    return bound


def recurrent_bound(item: DerivedLayer) -> RecurrentBound:
    """The proved flow through time of a layer unrolled over time (see the module doc)."""
    unrolled = item.derivation
    if unrolled.step is None:  # several parts (lstm): no bound sought
        states = tuple(s.name for s, _ in unrolled.states)
        return RecurrentBound(item.name, item.layer.kind, item.placed.in_shape[0], states,
                              states[0], [[None] * len(states) for _ in states], None,
                              several_parts=True)
    cell, form = unrolled.step, unrolled.step.form
    edges = stage_edges(unrolled.cell.parts[0], cell, item.name)
    states = [(state.name, new.name) for state, new in unrolled.states]
    transition = []
    for _, new in states:
        row = []
        for state, _ in states:
            row.append(_reach(form, edges, state).get(new, sp.Integer(0)))
        transition.append(row)
    output = next(state for state, new in states if new == form.output.name)
    step_input = _reach(form, edges, form.inputs[0].name).get(form.output.name)
    listed = [(stage, source, jac) for (stage, source), jac in edges.items()]
    return RecurrentBound(item.name, item.layer.kind, item.placed.in_shape[0],
                          tuple(s for s, _ in states), output, transition, step_input, listed)


# -- measured --------------------------------------------------------------------------------
def state_gradients(module, stem: str, unrolled, kept, params: dict, last):
    """``dL/dh_t`` for t = T..1 (the first is ``last``, ``dL/dh_T``) that reaches each state
    from the last alone (the other states' gradients 0 at T): the generated backward of each
    of the cell's parts (``<stem>_cell_backward``, the ones the layer's backward loops over)
    run over the steps in reverse part order with the forward's kept arrays ``kept``, each
    state's gradient the sum of what the parts reading it hand back. ``params``: the layer's
    parameters by name (a part's gate block is its rows of one)."""
    from ..naming import backward_function

    parts, states = unrolled.parts, unrolled.cell.states
    stems = [f"{stem}_cell" if len(parts) == 1 else f"{stem}_cell_{s}"
             for s in unrolled.part_states]
    at = dict(zip(unrolled.kept_names, kept, strict=True))

    def param(name):
        of, block, count = unrolled.cell.blocks.get(name, (name, 0, 1))
        return np.split(params[of], count)[block]

    current = {s: np.zeros_like(last) for s in states} | {states[0]: last}
    gradients = [last]
    for t in reversed(range(1, len(kept[0]))):
        new = {f"{s}_new": g for s, g in current.items()}
        before = {s: np.zeros_like(last) for s in states}
        for part_stem, part in reversed(list(zip(stems, parts, strict=True))):
            backward = getattr(module, backward_function(part_stem))
            results = backward(new[part.form.output.name], *(at[a.name][t] for a in part.cached),
                               *(param(p.name) for p in part.params_read))
            for array, gradient in zip(part.form.differentiable, results, strict=True):
                for into in (before, new):
                    if array.name in into:
                        into[array.name] = into[array.name] + gradient
        current = before
        gradients.append(current[states[0]])
    return gradients


def _owner(array: np.ndarray) -> np.ndarray:
    """The array whose memory ``array`` views (itself if it owns its memory)."""
    while array.base is not None and isinstance(array.base, np.ndarray):
        array = array.base
    return array


def norms(gradients) -> list[float]:
    return [float(np.linalg.norm(g)) for g in gradients]


@dataclass
class OverTime:
    """One layer unrolled over time, measured: the proved flow ``bound``, ``measured[k]``
    = ``||dL/dh_{T-k}||`` (Frobenius, over the batch) reaching each state from ``dL/dh_T``,
    ``proved[k]`` the bound times ``measured[0]`` at these weights; what the layer keeps for
    BPTT: ``formula`` (elements, in its sizes), ``predicted`` and ``measured_bytes``."""

    bound: RecurrentBound
    measured: list[float]
    proved: list[float]
    per_step: float | None
    formula: sp.Expr
    predicted: int
    measured_bytes: int


def over_time(net, derivation, *, batch: int, seed: int, module) -> list[OverTime]:
    """:class:`OverTime` for every layer of ``net`` unrolled over time, at the initial
    parameters of ``module`` (float64) on a seeded random batch, as :func:`~.numeric.measure`."""
    from ..emit.module import function_stems
    from .memory import memory_model
    from .numeric import (
        backward_trace,
        evaluate_bound,
        input_arrays,
        loss_gradient,
        plan_for,
        setup,
    )

    unrolled = [item for item in derivation.layers if item.derivation.cell is not None]
    if not unrolled:
        return []
    module, params, x, y = setup(net, batch=batch, seed=seed, module=module)
    out, cache = module.forward(params, *input_arrays(net, x).values(), train=True,
                                rng=np.random.default_rng(seed))
    _, dout = (float(np.sum(out * y)), y) if net.loss is None else loss_gradient(
        net, module, out, y)
    trace = backward_trace(net, module, params, cache, dout)
    kept = {layer.layer: layer for layer in memory_model(net)}
    results = []
    for item in unrolled:
        found = recurrent_bound(item)
        step = plan_for(net).step(item.name)
        last = trace.grad_out[item.name]
        last = last[:, -1] if last.ndim == 3 else last  # every state out: h_T's own part
        owner = net.find(item.name).param_owner or item.name
        values = {p.name: params[f"{owner}.{p.name}"] for p in item.derivation.form.params}
        stem = function_stems(net)[item.name] + step.stem_suffix
        measured = norms(state_gradients(module, stem, item.derivation, cache[item.name],
                                         values, last))
        per_step, proved = None, [None] * len(measured)  # several parts (lstm): no bound
        if found.per_step is not None:
            per_step = evaluate_bound(found.per_step, net, params, cache)
            proved = [per_step ** lag * measured[0] for lag in range(len(measured))]
        memory = kept[item.name]
        held = item.derivation.kept_storage  # a view (h[t-1], h[t]): counted as its array
        formula = sp.Add(*[sp.Mul(*held.get(e.name, e).dims) for e in memory.entries
                           if e.shared_with is None])
        elements = sum(int(e.elements.subs(N_SIZE, batch)) for e in memory.entries
                       if e.shared_with is None)
        arrays = {id(a): a for a in map(_owner, cache[item.name])}
        results.append(OverTime(found, measured, proved, per_step, sp.factor(formula),
                                elements * 8, sum(a.nbytes for a in arrays.values())))
    return results


# -- text ----------------------------------------------------------------------------------------
def bound_text(found: RecurrentBound) -> list[str]:
    """The symbolic part: the stages' edges, one step's bound, the bound over the steps."""
    lines = [f"Backpropagation through time in {found.layer} ({found.kind}, T = {found.steps} "
             "steps): the bound on ||d h_T / d h_t||_2, from the cell's derived stages"]
    lines += [f"  {reason}" for reason in found.reasons()]
    if found.several_parts:
        lines.append(f"  no bound sought: {found.kind}'s step multiplies arrays of the step "
                     "(element-wise products of its gates and states, as for a product layer); "
                     "the norms over t are measured below")
        return lines
    state = found.output
    if found.per_step is None:
        lines.append("  no bound found on one step's ||d h_new / d h||_2"
                     if len(found.states) == 1 else
                     f"  one step: M = {sp.sstr(found.transition)} bounds ||d new_i / d s_j||_2 "
                     f"(states {', '.join(found.states)})")
        return lines
    lines.append(f"  one step: ||d {state}_new / d {state}||_2 <= {sp.sstr(found.per_step)} "
                 "(the products of the edges along each path, summed)")
    lines.append(f"  so ||dL/d{state}_t|| <= {sp.sstr(found.per_step ** LAG)} * "
                 f"||dL/d{state}_T|| (the gradient reaching {state}_t from {state}_T)")
    return lines


def over_time_table(result: OverTime, *, seed: int, batch: int) -> str:
    """The measured norms over t next to the proved bound, and what BPTT keeps."""
    found = result.bound
    state = found.output
    bound = ("no proved bound" if result.per_step is None else
             f"proved bound {sp.sstr(found.per_step ** LAG)} * ||dL/d{state}_T|| with "
             f"{sp.sstr(found.per_step)} = {result.per_step:.4g}")
    lines = [f"{found.layer} over time (seed {seed}, batch {batch}, float64): ||dL/d{state}_t|| "
             f"reaching {state}_t from {state}_T, by the generated cell backward; {bound}"]
    header = f"{'t':>6} {'T-t':>5} {'measured':>12} {'proved bound':>13}"
    lines += [header, "-" * len(header)]
    for lag, (value, bound) in enumerate(zip(result.measured, result.proved, strict=True)):
        bound = "-" if bound is None else f"{bound:.4g}"
        lines.append(f"{found.steps - lag:>6} {lag:>5} {value:>12.4g} {bound:>13}")
    lines.append(f"BPTT keeps {sp.sstr(result.formula)} elements for {found.layer} (each step's "
                 f"arrays, proportional to T): at N = {batch}, T = {found.steps}, "
                 f"{result.predicted} B predicted, {result.measured_bytes} B measured "
                 f"({'matches' if result.predicted == result.measured_bytes else 'DIFFERS'})")
    return "\n".join(lines)
