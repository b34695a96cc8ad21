"""Check a generated module's gradients against finite differences (float64).

Two checks, as JAX's ``check_vjp`` and PyTorch's fast gradcheck do: entry by entry (a seeded
sample of entries per tensor, every entry of small tensors, or all with ``full``), and the whole
VJP along a few seeded random directions (``<grad, v>`` against the derivative of
``t -> L(p + t v)``), which covers every entry at once. Random slopes (rrelu) are held fixed
between the perturbed evaluations by re-seeding the generator each time.

Each derivative is estimated on a ladder of steps (:data:`STEPS`), at each step ``h`` from four
evaluations, ``L(p +- h)`` and ``L(p +- h/2)``:

* the estimate is Richardson's extrapolation of the two central differences,
  ``(4 D(h/2) - D(h)) / 3``, whose error shrinks as ``h**4`` (a plain central difference's as
  ``h**2``, too slow where the loss is strongly curved);
* the estimate's own uncertainty is measured, not assumed: the truncation error from how much
  ``D(h)`` and ``D(h/2)`` differ, the rounding error from the loss's measured rounding noise
  (see :func:`rounding_noise`) divided by the step, and a kink test on the one-sided slopes at
  the steps actually used: for a smooth loss the gap between the right and the left slope
  halves with the step, across a kink within the step it does not;
* an entry passes when the relative error ``|g - R| / max(|g|, |R|, guard)`` is below
  :data:`TOLERANCE`, where the denominator guard is the rounding error of ``R`` divided by the
  tolerance (an entry that is rounding noise of the loss is compared with the noise); it fails
  as soon as two successive steps agree with each other and the disagreement is larger than
  twice the uncertainty of the estimate; otherwise the next, smaller step is tried (a loss
  with many ReLU kinks, as behind a convolution, is rough at large steps and smooth at small
  ones). An entry whose disagreement is still explained by a kink at the smallest step is
  reported as ``kink`` and not counted; anything else left over fails.

Deep networks (issue 27): 16 blocks of linear -> batch norm -> relu at batch 4 have gradients
that grow with depth (batch norm's gradient explosion: the input gradient is about 70 at 16
blocks, 1e7 at 32), so a unit step of an early entry moves thousands of pre-activations, and
the ReLU kinks nearest the point are 1e-6 to 1e-5 away (1e-9 at 32 blocks). Every step above
that crosses many kinks; there the estimates are smooth-looking averages of the slope over the
step, a few percent from the derivative and from one another, and the kink test (one kink) does
not see them. The check used to take two such estimates agreeing to within a quarter of their
disagreement for convergence, and failed a correct module. Now:

* the ladder goes on down to 1e-12, and a wrong derivative is decided only when
  :data:`CONVERGED_RUNGS` successive steps agree to :data:`CONVERGED` (or to their rounding),
  show no kink, and disagree by four times that (:func:`_converged_and_wrong`): rough steps
  never fail an entry, they are stepped under;
* a disagreement that no longer changes with the step stops the descent before the next step's
  rounding would reach it, so that a wrong derivative is not passed as noise;
* the noise of the entries is measured along ``x`` alone (every layer depends on it): along a
  direction of all tensors the moved point is itself rounded, which adds ``|grad| * ulp`` per
  entry, 1e-7 of noise at 32 blocks against the loss's own 1e-9, and blinded the check;
* an entry starts one step above the one that decided the tensor's previous entry (and starts
  again from the top if that leaves it undecided), so that the number of evaluations per entry
  does not grow with depth.

Cost: each checked entry takes a few evaluations of the loss, each a forward pass, so the
time is (entries checked) x (forward pass): both grow with depth, and the product grows as its
square (a per-entry check of a black-box loss cannot do better; only the number of evaluations
per entry can be kept flat).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..declare.net import Net
from ..derivation.plan import INPUT, Plan
from ..emit.module import generate_module
from ..errors import SpecError
from ..naming import forward_function
from . import local

#: The ladder of steps; at each step ``h`` the loss is evaluated at ``+-h`` and ``+-h/2``.
STEPS = tuple(10.0**-k for k in range(3, 13))
TOLERANCE = 1e-6
#: A wrong derivative is decided by this many successive steps agreeing to this relative precision.
CONVERGED_RUNGS = 3
CONVERGED = 1e-5
SAMPLE = 24
SMALL = 64
DIRECTIONS = 3
#: Rounding noise of the loss beyond this fraction of its value: the check cannot resolve it
#: (64 blocks of linear -> batch norm -> relu at batch 4: gradients of 1e12, noise of 5 on a
#: loss of 2.3), and the report says so.
CHAOTIC = 1e-10
#: ... or a slope beyond this many times the loss: finite differences of the whole network
#: cannot resolve it (see :func:`_resolvable`).
STEEP = 1e6
#: A bound on one loss value's rounding error, in measured standard deviations.
NOISE_BOUND = 5.0
#: Spacing of the evaluations that measure the rounding noise (third differences).
NOISE_SPACING = 1e-11
NOISE_POINTS = 17
EPS = float(np.finfo(np.float64).eps)


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


@dataclass
class Estimate:
    """One derivative checked against the finite differences."""

    error: float  # relative error, with the denominator guard; inf for non-finite values
    numeric: float  # the finite-difference estimate at the deciding step
    kink: bool = False  # a kink within the smallest step explains the disagreement
    refined: bool = False  # decided at a step below the first one
    #: the index in :data:`STEPS` of the deciding step: the next entry of the tensor starts
    #: one above it (see :func:`estimate`'s ``start``)
    rung: int = 0
    #: failed by successive steps that agree with one another and not with the derivative
    decided: bool = False


def make_inputs(net: Net, module, *, batch: int, seed: int):
    """Float64 parameters, a random batch and matching labels or targets."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=np.float64)
    # Perturb the deterministic init (zero biases, unit gammas) so nothing is special.
    params = {k: np.array(v + 0.1 * rng.standard_normal(v.shape)) for k, v in params.items()}
    x = rng.standard_normal((batch, *net.input_shape))
    if net.loss is None:
        y = rng.standard_normal((batch, *net.output_shape))
    elif net.loss.target_kind == "labels":
        y = rng.integers(0, net.output_shape[0], size=batch)
    elif net.loss.target_range is not None:  # probabilities
        y = rng.uniform(*net.loss.target_range, size=(batch, *net.output_shape))
    else:
        y = rng.standard_normal((batch, *net.output_shape))
    return params, x, y


def estimate(
    phi: Callable[[float], tuple[float, float]],
    center: float,
    exact: float,
    noise: float,
    start: int = 0,
) -> Estimate:
    """Check ``exact`` against the derivative at 0 of a function of one variable.

    ``phi(t)`` returns ``(value, actual step)``: the function at the point moved by about ``t``
    and the step actually taken (``(p + t) - p`` after rounding); ``center`` is the value at the
    point and ``noise`` a bound on the rounding error of one value. ``start``: the first step
    tried, an index in :data:`STEPS` (the entries of one tensor are alike: a deep network's first
    layers need steps of 1e-9, and descending to them from 1e-3 for every entry cost 7 rungs of
    4 evaluations each); an entry left undecided from there is estimated again from the top.
    """
    errors: list[float] = []
    rungs: list[tuple[float, float, float, float]] = []  # (numeric, kink, rounding, difference)
    kink = difference = 0.0
    kinked = False
    numeric = math.nan
    for rung in range(start, len(STEPS)):
        nominal = STEPS[rung]
        (f1p, h1p), (f1m, h1m) = phi(nominal), phi(-nominal)
        (f2p, h2p), (f2m, h2m) = phi(nominal / 2), phi(-nominal / 2)
        if not (h1p > 0 > h1m and h2p > 0 > h2m):  # a step lost to rounding: nothing to learn
            return Estimate(math.inf, math.nan, refined=rung > 0, rung=rung)
        step = (h1p - h1m) / 2  # as taken (see _entry_phi), for the error bounds below
        d1 = (f1p - f1m) / (h1p - h1m)
        d2 = (f2p - f2m) / (h2p - h2m)
        numeric = (4 * d2 - d1) / 3
        # One-sided slopes: for a smooth function right - left = h f'' + O(h**3), so the gap at
        # h is twice the gap at h/2; a kink within the step breaks that.
        gap1 = (f1p - center) / h1p - (center - f1m) / -h1m
        gap2 = (f2p - center) / h2p - (center - f2m) / -h2m
        rounding = 3 * noise / step  # bounds the rounding error of ``numeric``
        difference = abs(exact - numeric)
        if not math.isfinite(difference):
            return Estimate(math.inf, numeric, refined=rung > 0, rung=rung)
        guard = max(abs(exact), abs(numeric), rounding / TOLERANCE, np.finfo(float).tiny)
        error = difference / guard
        if error < TOLERANCE:
            return Estimate(error, numeric, refined=rung > 0, rung=rung)
        errors.append(error)
        kink = max(0.0, abs(gap1 - 2 * gap2) - 20 * noise / step)
        if kink > difference / 4:
            kinked = True
        elif 20 * noise / step < difference / 4:  # the kink test could have seen one here
            kinked = False
        rungs.append((numeric, kink, rounding, difference))
        if _converged_and_wrong(rungs[-CONVERGED_RUNGS:]):
            return Estimate(error, numeric, refined=True, rung=rung, decided=True)
        if (
            len(rungs) > 1
            and rounding * STEPS[0] / STEPS[1] > difference / 4
            and abs(numeric - rungs[-2][0]) < difference / 2
            and kink < difference / 4
        ):
            # A disagreement that no longer changes with the step, and the next step's rounding
            # would reach it: comparing with the noise would hide it. Stop here.
            break
    if kinked:  # at the smallest step where the kink test could see one
        result = Estimate(0.0, numeric, kink=True, refined=True, rung=len(STEPS) - 1)
    else:
        result = Estimate(min(errors), numeric, refined=True, rung=len(STEPS) - 1)
    return estimate(phi, center, exact, noise) if start > 0 else result


def _converged_and_wrong(rungs: list[tuple[float, float, float, float]]) -> bool:
    """Whether the estimates at the last :data:`CONVERGED_RUNGS` steps show a wrong derivative.

    They must agree with one another to :data:`CONVERGED` (or to their rounding), show no kink,
    and disagree with the derivative by four times their spread and rounding. Steps that cross
    many kinks (a deep network behind ReLUs, where each step moves thousands of
    pre-activations) give estimates that are smooth-looking averages of the slope over the
    step, a few percent apart from one another and from the derivative at the point: two of
    them agreeing to within a quarter of the disagreement was once taken for convergence;
    three agreeing to 1e-5 does not happen by chance.
    """
    if len(rungs) < CONVERGED_RUNGS:
        return False
    estimates = [numeric for numeric, _, _, _ in rungs]
    rounding = max(r for _, _, r, _ in rungs)
    spread = max(estimates) - min(estimates)
    scale = max(abs(e) for e in estimates)
    difference = rungs[-1][3]
    return (
        spread <= CONVERGED * scale + 2 * rounding
        and all(kink < diff / 4 for _, kink, _, diff in rungs)
        and 4 * (spread + rounding) < difference
    )


def rounding_noise(
    phi: Callable[[float], float | tuple[float, float]], center: float, magnitude: float = 0.0
) -> float:
    """A bound on the rounding error of one value of the loss, from the loss itself.

    :data:`NOISE_POINTS` values along a direction, :data:`NOISE_SPACING` apart: their third
    differences cancel the smooth part (up to ``f''' * spacing**3``) and leave the rounding
    noise, whose standard deviation is estimated robustly (median absolute value; a third
    difference of independent errors has 20 times their variance). Where ``phi`` also returns
    the offset actually taken (an entry: ``p + t`` is rounded), the third differences are
    divided differences at the actual offsets, which cancel the smooth part just as well.
    Never below one unit of rounding of the loss's value, or of ``magnitude`` (the sum of the
    absolute values of its terms, where they cancel).
    """
    half = NOISE_POINTS // 2
    points = [phi(k * NOISE_SPACING) for k in range(-half, half + 1)]
    if isinstance(points[0], tuple):
        third = np.array([value for value, _ in points])
        offsets = np.array([offset for _, offset in points])
        # (an entry so large that the spacing is below its unit of rounding repeats offsets:
        # those differences are left out)
        with np.errstate(divide="ignore", invalid="ignore"):
            for order in range(1, 4):  # divided differences, scaled back to equal spacing's
                third = (np.diff(third) / (offsets[order:] - offsets[:-order])
                         * (order * NOISE_SPACING))
        third = third[np.isfinite(third)]
    else:
        third = np.diff(np.array(points), 3)
    deviation = float(np.median(np.abs(third))) / 0.6745 / math.sqrt(20) if third.size else 0.0
    if not math.isfinite(deviation):
        deviation = 0.0
    return NOISE_BOUND * max(deviation, EPS * abs(center), EPS * magnitude)


def check_module(net: Net, module, *, batch: int = 4, seed: int = 0, full: bool = False) -> Report:
    """Check ``module`` (generated for ``net``) at a seeded random batch: layer by layer (see
    :mod:`.local`), then the whole network along :data:`DIRECTIONS` random directions."""
    params, x, y = make_inputs(net, module, batch=batch, seed=seed)
    generator = np.random.default_rng(seed + 1)
    drawn = generator.bit_generator.state

    def rng() -> np.random.Generator:
        """The same rrelu slopes at every evaluation (resetting is 10x cheaper than seeding)."""
        generator.bit_generator.state = drawn
        return generator

    def grads_of(values):
        p = {k: v for k, v in values.items() if k != "x"}
        if net.loss is None:
            out, cache = module.forward(p, values["x"], train=True, rng=rng())
            return float(np.sum(out * y)), module.backward(p, cache, y.astype(out.dtype))
        loss, grads = module.loss_and_grads(p, values["x"], y, rng=rng())
        return float(loss), grads

    values = {**params, "x": x}
    center, analytic = grads_of(values)
    report = Report()
    rows, plan = _layer_rows(net, module, params, x, y, rng, analytic, seed, full)
    report.rows.extend(rows)

    loss_of = _loss_function(net, module, y, rng)
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
        moved = ["x"] * (start == 0) + [
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


def _layer_rows(net, module, params, x, y, rng, analytic, seed, full) -> tuple[list[Row], Plan]:
    """The layer-by-layer rows (:mod:`.local`), in backward order: the loss, then per step
    its parameters and the inputs whose gradient it completes."""
    loss_calls = local.step_calls(net, module)[2]
    target = y
    if net.loss is not None and net.loss.target_kind == "labels":
        target = np.eye(net.output_shape[0])[y]

    def dout_of(out):
        if loss_calls is None:
            return y.astype(out.dtype)
        return loss_calls[1](*loss_calls[0](out, target.astype(out.dtype))[1])

    run = local.sweep(net, module, params, x, rng(), dout_of)
    plan = run.plan
    out, _ = module.forward(params, x, train=True, rng=rng())
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
            return float(loss_calls[0](u, target.astype(u.dtype))[0])

        grad = analytic["x"] if plan.output == INPUT else run.grads[plan.output]
        name = "x" if plan.output == INPUT else f"d{plan.output}"
        rows.append(row(name, f"loss ({net.loss.kind})", loss_of,
                        abs(float(np.sum(np.abs(mine * grad)))), mine, grad))
    for step in reversed(plan.forward):
        for key in step.params:
            evaluate, magnitude = local.local_function(run, params, param=key)
            rows.append(row(key, step.name, evaluate, magnitude, params[key], analytic[key]))
        for value in dict.fromkeys(step.inputs):
            if plan.readers[value][0] != step.name:
                continue  # its gradient is complete at its first reader
            evaluate, magnitude = local.local_function(run, params, value=value)
            grad = analytic["x"] if value == INPUT else run.grads[value]
            name = "x" if value == INPUT else f"d{value}"
            rows.append(row(name, local.readers_of(plan, value), evaluate, magnitude,
                            run.values[value], grad))
    return rows, plan


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
        phi = _entry_phi(evaluate, array, position)
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


def _loss_function(net: Net, module, y, rng) -> Callable[[dict[str, np.ndarray]], float]:
    """The training-mode loss from the forward pass alone (half the cost of ``loss_and_grads``):
    ``forward`` and the loss's own ``<stem>_forward`` function, as ``loss_and_grads`` calls
    them; labels become one-hot rows. Without a loss, ``sum(out * y)``."""
    loss_forward = None if net.loss is None else getattr(
        module, forward_function(net.loss.function_stem), None
    )
    target = y
    if net.loss is not None and net.loss.target_kind == "labels":
        target = np.eye(net.output_shape[0])[y]

    def loss_of(values: dict[str, np.ndarray]) -> float:
        p = {k: v for k, v in values.items() if k != "x"}
        out, _ = module.forward(p, values["x"], train=True, rng=rng())
        if net.loss is None:
            return float(np.sum(out * y))
        if loss_forward is None:
            return float(module.loss_and_grads(p, values["x"], y, rng=rng(), wrt_input=False)[0])
        return float(loss_forward(out, target)[0])

    return loss_of


def _entry_phi(evaluate, array, position):
    """``evaluate(array)`` as a function of one entry's offset, with the step actually taken.

    Offsets are scaled up for entries beyond 2**20 in size, so that even the smallest step
    of the ladder moves them by 1e-12 of their value or more (at 1e17 a step of 1e-3 was lost
    to rounding altogether); smaller entries take the offsets as they are.
    """
    original = array[position]
    scale = max(1.0, abs(float(original)) / 2**20)

    def phi(offset: float) -> tuple[float, float]:
        moved = original + offset * scale
        array[position] = moved
        try:
            return evaluate(array), float(moved - original)
        finally:
            array[position] = original

    return phi


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
