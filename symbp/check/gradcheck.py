"""Check a generated module's gradients against central finite differences (float64).

Two checks, as JAX's ``check_vjp`` and PyTorch's fast gradcheck do: entry by entry (a seeded
sample of entries per tensor, every entry of small tensors, or all with ``full``), and the whole
VJP along a few seeded random directions (``<grad, v>`` against ``(L(p + h v) - L(p - h v)) /
2h``), which covers every entry at once. Random slopes (rrelu) are held fixed between the
perturbed evaluations by re-seeding the generator each time.

An entry whose one-sided differences disagree (a ReLU-like kink within ``h`` of the point) is
reported as ``kink`` and not counted as a failure.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import numpy as np

from ..declare.net import Net
from ..emit.module import generate_module

STEP = 1e-5
#: along a direction every entry moves at once: a smaller step stays clear of ReLU kinks
DIRECTION_STEP = 1e-6
TOLERANCE = 1e-6
SAMPLE = 24
SMALL = 64
DIRECTIONS = 3


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

    @property
    def passed(self) -> bool:
        return self.max_error < TOLERANCE


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def table(self) -> str:
        header = f"{'gradient':<24} {'shape':<14} {'checked':>7} {'max rel err':>12}  result"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            result = "pass" if row.passed else "FAIL"
            if row.kinks:
                result += f" ({row.kinks} at a kink, skipped)"
            lines.append(
                f"{row.name:<24} {str(row.shape):<14} {row.checked:>7} {row.max_error:>12.2e}  "
                f"{result}"
            )
        total = sum(r.passed for r in self.rows)
        lines.append(f"{total} passed, {len(self.rows) - total} failed")
        return "\n".join(lines)


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
    elif net.loss.kind == "bce_with_logits":
        y = rng.uniform(0.0, 1.0, size=(batch, *net.output_shape))
    else:
        y = rng.standard_normal((batch, *net.output_shape))
    return params, x, y


def check_module(net: Net, module, *, batch: int = 4, seed: int = 0, full: bool = False) -> Report:
    params, x, y = make_inputs(net, module, batch=batch, seed=seed)

    def loss_of(values: dict[str, np.ndarray]) -> float:
        p = {k: v for k, v in values.items() if k != "x"}
        rng = np.random.default_rng(seed + 1)
        if net.loss is None:
            out, _ = module.forward(p, values["x"], train=True, rng=rng)
            return float(np.sum(out * y))
        loss, _ = module.loss_and_grads(p, values["x"], y, rng=rng)
        return float(loss)

    def grads_of(values):
        p = {k: v for k, v in values.items() if k != "x"}
        rng = np.random.default_rng(seed + 1)
        if net.loss is None:
            out, cache = module.forward(p, values["x"], train=True, rng=rng)
            return module.backward(p, cache, y.astype(out.dtype))
        _, grads = module.loss_and_grads(p, values["x"], y, rng=rng)
        return grads

    values = {**params, "x": x}
    analytic = grads_of(values)
    scale = max(float(np.max(np.abs(g))) for g in analytic.values() if g.size) or 1.0
    floor = max(1e-8, 1e-4 * scale)  # the denominator guard: FD noise is absolute
    report = Report()
    picker = np.random.default_rng(seed + 2)
    for name, value in values.items():
        grad = analytic[name]
        flat_count = value.size
        if full or flat_count <= SMALL:
            entries = np.arange(flat_count)
        else:
            entries = np.sort(picker.choice(flat_count, size=SAMPLE, replace=False))
        worst, kinks = 0.0, 0
        for entry in entries:
            position = np.unravel_index(entry, value.shape) if value.shape else ()
            numeric, kink = _central(loss_of, values, name, position)
            if kink:
                kinks += 1
                continue
            exact = float(grad[position])
            error = abs(exact - numeric) / max(abs(exact), abs(numeric), floor)
            worst = max(worst, error)
        report.rows.append(Row(name, tuple(value.shape), len(entries), worst, kinks))
    direction_rng = np.random.default_rng(seed + 3)
    for k in range(DIRECTIONS):
        direction = {n: direction_rng.standard_normal(v.shape) for n, v in values.items()}
        exact = sum(float(np.sum(analytic[n] * d)) for n, d in direction.items())
        plus = {n: v + DIRECTION_STEP * direction[n] for n, v in values.items()}
        minus = {n: v - DIRECTION_STEP * direction[n] for n, v in values.items()}
        numeric = (loss_of(plus) - loss_of(minus)) / (2 * DIRECTION_STEP)
        error = abs(exact - numeric) / max(abs(exact), abs(numeric), floor)
        report.rows.append(Row(f"vjp direction {k + 1}", (), 1, error))
    return report


def _central(loss_of, values, name, position):
    """Central difference at one entry, and whether a kink lies within the step.

    For a smooth function the one-sided slopes differ by about ``h * f''``, so the gap shrinks
    tenfold with a tenfold smaller step; across a kink it stays the size of the jump.
    """
    original = values[name][position]

    def at(offset):
        values[name][position] = original + offset
        try:
            return loss_of(values)
        finally:
            values[name][position] = original

    center = loss_of(values)
    plus, minus = at(STEP), at(-STEP)
    numeric = (plus - minus) / (2 * STEP)
    gap = (plus - center) / STEP - (center - minus) / STEP
    kink = False
    if abs(gap) > 1e-4 * max(abs(numeric), 1e-8):
        small = STEP / 10
        finer = (at(small) - center) / small - (center - at(-small)) / small
        kink = abs(finer) > 0.5 * abs(gap)
    return numeric, kink


def check_spec(net: Net, *, batch: int = 4, seed: int = 0, full: bool = False) -> Report:
    """Generate the module for ``net`` in memory and check it."""
    module = load_module(generate_module(net))
    return check_module(net, module, batch=batch, seed=seed, full=full)
