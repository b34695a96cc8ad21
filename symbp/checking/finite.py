"""Finite differences of a function of one variable, with a measured error (float64).

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

Deep networks behind ReLUs put kinks close to the point (a unit step of an early entry moves
thousands of pre-activations); the ladder steps under them:

* a wrong derivative is decided only when :data:`CONVERGED_RUNGS` successive steps agree to
  :data:`CONVERGED` (or to their rounding), show no kink, and disagree by four times that
  (:func:`_converged_and_wrong`): rough steps never fail an entry, they are stepped under;
* a disagreement that no longer changes with the step stops the descent before the next step's
  rounding would reach it, so that a wrong derivative is not passed as noise;
* a kink is the one seen at the smallest step where the kink test could still see one (a tie
  in a max-pooling window of ReLU zeros is a kink at the point, which the noise of the
  smallest steps hides);
* an entry starts one step above the one that decided the tensor's previous entry (and starts
  again from the top if that leaves it undecided), so that the number of evaluations per entry
  stays flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: The ladder of steps; at each step ``h`` the loss is evaluated at ``+-h`` and ``+-h/2``.
STEPS = tuple(10.0**-k for k in range(3, 13))
TOLERANCE = 1e-6
#: A wrong derivative is decided by this many successive steps agreeing to this relative precision.
CONVERGED_RUNGS = 3
CONVERGED = 1e-5
#: A bound on one loss value's rounding error, in measured standard deviations.
NOISE_BOUND = 5.0
#: Spacing of the evaluations that measure the rounding noise (third differences).
NOISE_SPACING = 1e-11
NOISE_POINTS = 17
EPS = float(np.finfo(np.float64).eps)


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


def entry_phi(evaluate, array, position):
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
