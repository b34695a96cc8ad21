"""Check a generated module's gradients against finite differences (float64).

Two parts, both in the report:

* **layer by layer** (:mod:`.local`): the network plan is run once forward and once backward
  with the module's own layer functions; each gradient the module returns (every parameter,
  ``x``) and each gradient one layer hands to the next is compared with finite differences of
  the one layer that computes it, contracted with its upstream gradient: a seeded sample of
  entries (every entry of small tensors, or all with ``full``) and, where the sample leaves
  some out, the whole gradient along one seeded random direction, as JAX's ``check_vjp`` and
  PyTorch's fast gradcheck do. Each row names the layer whose backward it checks;
* **the network**: the module's gradient against finite differences of its whole loss along
  :data:`DIRECTIONS` seeded random directions (``<grad, v>`` against the derivative of
  ``t -> L(p + t v)``), which covers the forward, the backward's sums and hand-overs and every
  entry at once. Where the whole loss is too rough for float64 (see :func:`_resolvable`) the
  directions move the parameters of the later half of the layers, the later quarter, ...:
  the deepest part that float64 resolves, and a note says so.

Random slopes (rrelu) are held fixed between the perturbed evaluations by re-seeding the
generator each time (the layer rows pass the drawn slopes as arguments).

Deep networks (issue 27): 64 blocks of linear -> batch norm -> relu at batch 4 have gradients
that grow with depth (batch norm's gradient explosion: the input gradient is about 70 at 16
blocks, 1e7 at 32, 1e13 at 64), so a unit step of an early entry moves thousands of
pre-activations, and the ReLU kinks nearest the point are 1e-6 away at 16 blocks, 1e-9 at 32
and below the smallest step at 64, where the loss (2) changes by 3 when the point moves by
1e-11. Finite differences of the whole network cannot see the derivative there; the check used
to perturb one entry and rerun the whole network for every entry, failed these right modules,
and took (entries) x (depth) evaluations of layers: quadratic in depth (185 s CPU at 64 blocks).
One layer alone is as well conditioned as that layer, whatever its depth: the layer rows pass
there, and a wrong line in any layer's backward fails that layer's rows. Each row takes a
bounded number of evaluations of one layer, so the time grows linearly with depth (about 5 s
CPU at 64 blocks, most of it deriving and generating the module; ``benchmarks/check_depth.py``).
Each derivative is estimated as :mod:`.finite` describes.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..declare.net import Net
from ..derivation.plan import Plan
from ..emit.module import generate_module
from ..errors import SpecError
from ..naming import forward_function
from ..runtime.targets import _one_hot
from . import local
from .finite import (  # the estimator, also for the tests
    NOISE_SPACING,
    STEPS,  # noqa: F401
    TOLERANCE,
    Estimate,  # noqa: F401
    entry_phi,
    estimate,
    rounding_noise,
)

#: Entries checked per gradient (all of a gradient up to SMALL entries, or with ``full``).
SAMPLE = 24
SMALL = 64
DIRECTIONS = 3
#: Rounding noise of the whole loss beyond this fraction of it (or of 1): finite differences of
#: the whole network cannot resolve it (64 blocks of linear -> batch norm -> relu at batch 4:
#: noise of 3 on a loss of 2), and the network's rows move a later part of it.
CHAOTIC = 1e-10
#: ... or a slope beyond this many times the loss: finite differences of the whole network
#: cannot resolve it (see :func:`_resolvable`).
STEEP = 1e6


def load_module(source: str, name: str = "symbp_generated") -> types.ModuleType:
    """Execute generated source (our own output, not user text) as a fresh module."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # noqa: S102
    return module


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    checked: int
    max_error: float
    kinks: int = 0
    #: entries that needed a step below the first one (strong curvature or a kink nearby)
    refined: int = 0
    #: the worst entry, e.g. ``[1, 0]: analytic 0.1234, finite differences 0.1236``
    worst: str = ""
    #: whose backward the row checks: a layer (its parameters, or the value it reads), the
    #: loss, or the whole ``network``
    layer: str = ""
    #: a whole-network direction that the loss's rounding noise does not let the finite
    #: differences resolve (neither passed nor failed; the layer rows stand)
    unresolved: bool = False
    #: also checked along one random direction (the entries were a sample)
    direction: bool = False

    @property
    def passed(self) -> bool:
        return self.unresolved or self.max_error < TOLERANCE


LEGEND = (
    "each layer's backward against finite differences of that layer alone (its upstream "
    "gradient from the layers above; a sample of entries, and one random direction where "
    "the sample leaves some out); then the whole network along random directions"
)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    #: lines printed under the table (what limits the check)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def table(self) -> str:
        width = max([24, *(len(row.name) + 1 for row in self.rows)])
        layer_width = max([12, *(len(row.layer) + 1 for row in self.rows)])
        header = (f"{'gradient':<{width}} {'backward of':<{layer_width}} {'shape':<14} "
                  f"{'checked':>7} {'max rel err':>12}  result")
        lines = [header, "-" * len(header)]
        for row in self.rows:
            notes = []
            if row.direction:
                notes.append("+ a direction")
            if row.refined:
                notes.append(f"{row.refined} at a smaller step")
            if row.kinks:
                notes.append(f"{row.kinks} at a kink, skipped")
            result = "pass" if row.passed else "FAIL"
            if row.unresolved:
                result = "unresolved (too rough, see the note)"
            elif notes:
                result += f" ({'; '.join(notes)})"
            lines.append(
                f"{row.name:<{width}} {row.layer:<{layer_width}} {str(row.shape):<14} "
                f"{row.checked:>7} {row.max_error:>12.2e}  {result}"
            )
        unresolved = sum(r.unresolved for r in self.rows)
        total = sum(r.passed and not r.unresolved for r in self.rows)
        summary = f"{total} passed, {len(self.rows) - total - unresolved} failed"
        lines.append(summary + (f", {unresolved} unresolved" if unresolved else ""))
        for row in self.rows:
            if not row.passed and row.worst:
                lines.append(f"worst {row.name}{row.worst}"
                             + (f" (backward of {row.layer})" if row.layer else ""))
        lines.extend(f"note: {note}" for note in [LEGEND, *self.notes])
        return "\n".join(lines)


def make_inputs(net: Net, module, *, batch: int, seed: int):
    """Float64 parameters, a random batch and matching labels or targets."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=np.float64)
    # Perturb the deterministic init (zero biases, unit gammas) so nothing is special.
    params = {k: np.array(v + 0.1 * rng.standard_normal(v.shape)) for k, v in params.items()}
    x = net.sample_input(rng, batch)
    if net.loss is None:
        y = rng.standard_normal((batch, *net.output_shape))
    elif net.loss.target_kind == "labels":
        y = rng.integers(0, net.output_shape[0], size=batch)
    elif net.loss.target_range is not None:  # probabilities
        y = rng.uniform(*net.loss.target_range, size=(batch, *net.output_shape))
    else:
        y = rng.standard_normal((batch, *net.output_shape))
    return params, x, y


def input_arrays(net: Net, x) -> dict[str, np.ndarray]:
    """The network's inputs by name, from :func:`make_inputs`'s ``x``."""
    return dict(x) if isinstance(x, dict) else {next(iter(net.inputs)): x}


def check_module(net: Net, module, *, batch: int = 4, seed: int = 0, full: bool = False) -> Report:
    """Check ``module`` (generated for ``net``) at a seeded random batch: layer by layer (see
    :mod:`.local`), then the whole network along :data:`DIRECTIONS` random directions."""
    params, x, y = make_inputs(net, module, batch=batch, seed=seed)
    x = input_arrays(net, x)
    names = list(x)
    generator = np.random.default_rng(seed + 1)
    drawn = generator.bit_generator.state

    def rng() -> np.random.Generator:
        """The same rrelu slopes at every evaluation (resetting is 10x cheaper than seeding)."""
        generator.bit_generator.state = drawn
        return generator

    def grads_of(values):
        p = {k: v for k, v in values.items() if k not in x}
        args = [values[n] for n in names]
        if net.loss is None:
            out, cache = module.forward(p, *args, train=True, rng=rng())
            return float(np.sum(out * y)), module.backward(p, cache, y.astype(out.dtype))
        loss, grads = module.loss_and_grads(p, *args, y, rng=rng())
        return float(loss), grads

    with np.errstate(all="ignore"):
        out, _ = module.forward(params, *x.values(), train=True, rng=rng())
    if not np.isfinite(out).all():
        return _not_finite(net, module, params, x, rng())
    values = {**params, **x}
    center, analytic = grads_of(values)
    report = Report()
    rows, plan, disagreement = _layer_rows(net, module, params, x, y, rng, analytic, seed, full)
    report.rows.extend(rows)
    if disagreement and not all(row.passed for row in rows):
        report.notes.append(disagreement)

    loss_of = _loss_function(net, module, y, rng, names)
    if loss_of(values) != center:  # the forward-only shortcut must be the same computation
        loss_of = lambda values: grads_of(values)[0]  # noqa: E731

    def along(direction):
        def phi(t: float) -> float:
            return loss_of({n: v + t * direction[n] if n in direction else v
                            for n, v in values.items()})

        return phi

    # The network's rows move every tensor; where that is too rough for float64 (a deep
    # network with batch norm at a small batch), the parameters of the later half of the
    # layers, of the later quarter, ...: the layers before compute the same bits, so the loss
    # is as smooth as the part that moves (see :func:`_resolvable`).
    directions = np.random.default_rng(seed + 3)
    count = len(plan.forward)
    start, moved, noise, whole = 0, [], math.inf, math.inf
    while start < count:
        moved = [n for n in names if n in analytic] * (start == 0) + [
            key for step in plan.forward[start:] for key in step.params
        ]
        probe = {n: directions.standard_normal(values[n].shape) for n in moved}
        # Along a direction the moved point is itself rounded (p + t v to the nearest float64),
        # which adds |grad| * ulp(p) of noise: measured here, with the loss's own.
        noise = rounding_noise(along(probe), center)
        whole = noise if start == 0 else whole
        slope = math.sqrt(sum(float(np.sum(np.square(analytic[n]))) for n in moved))
        if moved and _resolvable(noise, slope, center):
            break
        start = count - (count - start) // 2 if count - start > 1 else count
    if start > 0:
        first = plan.forward[start].name if start < count else None
        report.notes.append(
            f"the loss ({center:.4g}) changes by about {whole:.2g} when the point moves by "
            f"{NOISE_SPACING:g}, or its gradients are too large for finite differences of the "
            "whole network in float64 to resolve (a deep network with batch norm at a small "
            "batch explodes them): "
            + (f"the network's rows move the parameters from layer {first} on"
               if first else "the network's rows are left unresolved")
            + "; the layer-by-layer rows above do not depend on it"
        )
    layer = "network" if start == 0 else f"network from {plan.forward[start].name}" if (
        start < count) else "network"
    for k in range(DIRECTIONS):
        if start >= count:
            report.rows.append(Row(f"vjp direction {k + 1}", (), 0, math.nan, layer=layer,
                                   unresolved=True))
            continue
        direction = {n: directions.standard_normal(values[n].shape) for n in moved}
        exact = sum(float(np.sum(analytic[n] * d)) for n, d in direction.items())
        phi = along(direction)
        result = estimate(lambda t, phi=phi: (phi(t), t), center, exact, noise)
        detail = f": analytic {exact:.10g}, finite differences {result.numeric:.10g}"
        report.rows.append(
            Row(f"vjp direction {k + 1}", (), 1, result.error, int(result.kink),
                int(result.refined and not result.kink), detail, layer=layer)
        )
    return report


def _layer_rows(
    net, module, params, x, y, rng, analytic, seed, full
) -> tuple[list[Row], Plan, str]:
    """The layer-by-layer rows (:mod:`.local`), in backward order: the loss, then per step
    its parameters and the inputs whose gradient it completes."""
    prepared = local.step_calls(net, module)
    loss_calls = prepared[2]
    labels = net.loss is not None and net.loss.target_kind == "labels"

    def target(out):
        return _one_hot(y, out) if labels else y.astype(out.dtype)

    def dout_of(out):
        if loss_calls is None:
            return y.astype(out.dtype)
        return loss_calls[1](*loss_calls[0](out, target(out))[1])

    run = local.sweep(net, module, params, x, rng(), dout_of, prepared)
    plan = run.plan
    if net.decayed:  # J = L + s: the regulariser's gradient reaches its weights directly
        module.regularizer(params, run.param_grads)
    out, _ = module.forward(params, *x.values(), train=True, rng=rng())
    mine = run.values[plan.output]
    scale = max(float(np.max(np.abs(out), initial=0.0)), np.finfo(float).tiny)
    difference = float(np.max(np.abs(out - mine), initial=0.0)) / scale
    rows = [Row("forward", tuple(out.shape), out.size,
                difference if np.isfinite(difference) else math.inf, layer="network",
                worst=": the module's forward differs from its layer functions run in the "
                      "plan's order" if difference else "")]
    picker = np.random.default_rng(seed + 2)
    directions = np.random.default_rng(seed + 4)

    def row(name, layer, evaluate, magnitude, base, grad):
        return _tensor_row(name, layer, evaluate, magnitude, base, np.asarray(grad), picker,
                           directions, full)

    if loss_calls is not None:
        def loss_of(u):
            return float(loss_calls[0](u, target(u))[0])

        grad = run.grads[plan.output]
        if plan.output in plan.inputs:
            grad = analytic.get(plan.output, grad)
        name = plan.output if plan.output in plan.inputs else f"d{plan.output}"
        rows.append(row(name, f"loss ({net.loss.kind})", loss_of,
                        abs(float(np.sum(np.abs(mine * grad)))), mine, grad))
    done = set()  # a shared parameter: one row, at its last use
    for step in reversed(plan.forward):
        for key in step.params:
            if key in done:
                continue
            done.add(key)
            evaluate, magnitude = local.local_function(run, params, param=key)
            layer = step.name
            if key in net.decayed:
                evaluate, magnitude = _plus_regularizer(module, key, evaluate, magnitude, params)
                layer = f"{step.name} + weight decay"
            rows.append(row(key, layer, evaluate, magnitude, params[key], analytic[key]))
        for value in dict.fromkeys(step.grad_inputs):  # (integer ids have no gradient)
            if plan.readers[value][0] != step.name:
                continue  # its gradient is complete at its first reader
            evaluate, magnitude = local.local_function(run, params, value=value)
            given = value in plan.inputs
            grad = analytic.get(value, run.grads[value]) if given else run.grads[value]
            name = value if given else f"d{value}"
            rows.append(row(name, local.readers_of(plan, value), evaluate, magnitude,
                            run.values[value], grad))
    return rows, plan, _first_disagreement(plan, run, analytic)


def _plus_regularizer(module, key, evaluate, magnitude, params):
    """``F(u) + s(u)`` for a parameter that weight decay covers, ``s`` its term of the
    regulariser as the module computes it: the gradient is then ``dJ/dP``, the layer's part
    (through ``L``) plus the regulariser's, which ``loss_and_grads`` returns."""
    term = next(f for k, f, _ in module._DECAY_TERMS if k == key)

    def with_term(u: np.ndarray, magnitude: bool = False) -> float:
        return evaluate(u, magnitude) + float(term(u, weight_decay=module.WEIGHT_DECAY)[0])

    return with_term, magnitude + float(term(params[key], weight_decay=module.WEIGHT_DECAY)[0])


def _first_disagreement(plan: Plan, run: local.Sweep, analytic) -> str:
    """Where the module's gradients first (from the top) differ from its layer functions
    chained by the plan: the network's backward goes wrong between that layer and the ones
    above it (a sum or a hand-over), not in a layer's function. A note under a failing table
    (the rows below that point fail, though their layers' functions are right)."""
    chained = {**run.param_grads,
               **{name: run.grads[name] for name in plan.inputs if name in run.grads}}
    for step in reversed(plan.forward):
        for key in [*step.params, *(v for v in step.grad_inputs if v in plan.inputs)]:
            if key not in analytic:
                continue
            mine, theirs = np.asarray(chained[key]), np.asarray(analytic[key])
            scale = max(float(np.max(np.abs(mine), initial=0.0)), np.finfo(float).tiny)
            if not float(np.max(np.abs(mine - theirs), initial=0.0)) <= TOLERANCE * scale:
                return (f"the module's {key} differs from its layer functions chained by the "
                        f"plan: its backward goes wrong at {step.name} or between it and the "
                        "layers above (a sum or a hand-over), not in a layer's function")
    return ""


def _resolvable(noise: float, slope: float, loss: float) -> bool:
    """Whether finite differences of the loss along a random direction can be trusted: its
    rounding noise at most :data:`CHAOTIC` of the loss, and its slope (the norm of the gradient
    of what moves) at most :data:`STEEP` times the loss. A loss of 2 with a slope of 4e13 (64
    blocks of linear -> batch norm -> relu at batch 4) is linear only within 1e-13 of the
    point, below the smallest step: the estimates at every step are O(1) / step, agree with
    one another to their rounding, and once failed a right module as "converged and wrong".
    """
    scale = max(abs(loss), 1.0)
    return noise <= CHAOTIC * scale and slope <= STEEP * scale


def _tensor_row(name, layer, evaluate, magnitude, base, grad, picker, directions, full) -> Row:
    """One gradient against the derivative of ``evaluate`` (a function of one array): a
    sample of its entries (all with ``full`` or when small) and, when some are left out, the
    whole of it along one random direction."""
    array = np.array(base, dtype=np.float64)
    center = evaluate(array)
    count = array.size
    sampled = not (full or count <= SMALL)
    entries = np.sort(picker.choice(count, size=SAMPLE, replace=False)) if sampled else range(
        count)
    worst, kinks, refined, detail, start, noise = 0.0, 0, 0, "", 0, None
    for entry in entries:
        position = np.unravel_index(entry, array.shape) if array.shape else ()
        phi = entry_phi(evaluate, array, position)
        if noise is None:  # the rounding noise of F, measured along its first checked entry
            noise = rounding_noise(phi, center, magnitude)
        exact = float(grad[position])
        result = estimate(phi, center, exact, noise, start)
        if result.error < TOLERANCE and not result.kink:
            start = max(0, result.rung - 1)
        kinks += result.kink
        refined += result.refined and not result.kink
        if result.error > worst or (math.isnan(result.error) and not detail):
            worst = result.error if not math.isnan(result.error) else math.inf
            index = ", ".join(str(int(i)) for i in position)
            detail = (f"[{index}]: analytic {exact:.10g}, finite differences "
                      f"{result.numeric:.10g}")
    if sampled:
        direction = directions.standard_normal(array.shape)
        exact = float(np.sum(grad * direction))

        def along(t: float) -> float:
            return evaluate(array + t * direction)

        noise = rounding_noise(along, center, magnitude)
        result = estimate(lambda t: (along(t), t), center, exact, noise)
        kinks += result.kink
        refined += result.refined and not result.kink
        if result.error > worst:
            worst = result.error
            detail = (f" along a random direction: analytic {exact:.10g}, finite differences "
                      f"{result.numeric:.10g}")
    return Row(name, tuple(array.shape), len(entries), worst, kinks, refined, detail,
               layer=layer, direction=sampled)


def _loss_function(net: Net, module, y, rng, names) -> Callable[[dict[str, np.ndarray]], float]:
    """The training-mode loss from the forward pass alone (half the cost of ``loss_and_grads``):
    ``forward`` and the loss's own ``<stem>_forward`` function, as ``loss_and_grads`` calls
    them, plus weight decay's ``regularizer`` (the objective ``J = L + s``); labels become
    one-hot rows. Without a loss, ``sum(out * y)``."""
    loss_forward = None if net.loss is None else getattr(
        module, forward_function(net.loss.function_stem), None
    )
    labels = net.loss is not None and net.loss.target_kind == "labels"

    def loss_of(values: dict[str, np.ndarray]) -> float:
        p = {k: v for k, v in values.items() if k not in names}
        args = [values[n] for n in names]
        out, _ = module.forward(p, *args, train=True, rng=rng())
        if net.loss is None:
            return float(np.sum(out * y))
        if loss_forward is None:
            return float(module.loss_and_grads(p, *args, y, rng=rng(), wrt_input=False)[0])
        loss = loss_forward(out, _one_hot(y, out) if labels else y)[0]
        return float(loss + module.regularizer(p) if net.decayed else loss)  # J = L + s

    return loss_of


def _not_finite(net: Net, module, params, x, rng) -> Report:
    """The report on a network whose output overflows (inf or nan) at the check's inputs:
    finite differences of it mean nothing, so nothing else is checked; the row names the first
    layer whose values are not finite."""
    plan, calls, _ = local.step_calls(net, module)
    values, first = dict(x), None
    with np.errstate(all="ignore"):
        for step in plan.forward:
            inputs = [values[v] for v in step.inputs]
            drawn = [
                getattr(rng, method)(*args, size=inputs[0].shape).astype(inputs[0].dtype)
                for method, args in step.draws.values()
            ]
            result = local.run_step(calls[step.name], inputs, [params[k] for k in step.params],
                                    drawn)
            values[step.output] = result[0]
            if not np.isfinite(result[0]).all():
                first = step.name
                break
    out = values.get(plan.output, next(iter(x.values())))
    layer = first or "network"
    report = Report()
    report.rows.append(Row("forward", tuple(np.shape(out)), int(np.size(out)), math.inf,
                           layer=layer, worst=": inf or nan in the forward values"))
    report.notes.append(
        f"not checked: the forward values are not finite at the check's inputs (layer "
        f"'{layer}' gives inf or nan: an overflow), so finite differences cannot test the "
        "gradients; an activation that grows this fast needs inputs of a smaller scale"
    )
    return report


def check_spec(net: Net, *, batch: int = 4, seed: int = 0, full: bool = False) -> Report:
    """Generate the module for ``net`` in memory and check it.

    A batch too small for the network (batch norm trains on more than one value per feature)
    or a seed NumPy's generators refuse is bad input: a :class:`SpecError` naming the argument.
    """
    needs = {item.layer.min_values_per_statistic: item.layer for item in net.walk()}
    least = max(needs)
    if not _is_int(batch) or batch < least:
        why = f" ({needs[least].too_few_values})" if least > 1 else ""
        message = f"must be an integer of at least {least}{why}, got {batch!r}"
        raise SpecError(message, field="batch")
    if not _is_int(seed) or seed < 0:
        raise SpecError(f"must be a non-negative integer, got {seed!r}", field="seed")
    module = load_module(generate_module(net))
    return check_module(net, module, batch=batch, seed=seed, full=full)


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
