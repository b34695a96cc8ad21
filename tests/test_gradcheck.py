"""``symbp check``'s finite-difference machinery: it passes what is right and fails what is wrong.

The truths here are not the checker's own output:

* functions of one variable whose derivative is known from calculus: strongly curved ones
  (a plain central difference at a fixed step is off by far more than the tolerance), kinks at
  chosen distances from the point, and added noise of a known size;
* generated modules made subtly wrong on purpose: one gradient scaled by ``1 + 1e-4``, one
  entry shifted, the input gradient scaled in the generated source itself. Right modules are
  covered by tests/test_codegen.py (every example and layer type, and the autograd oracle).
"""

from __future__ import annotations

import hashlib
import math
import types
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.checking import gradcheck
from symbp.checking.gradcheck import (
    SAMPLE,
    TOLERANCE,
    check_module,
    estimate,
    load_module,
    make_inputs,
    rounding_noise,
)
from symbp.cli import main as cli_main
from symbp.declare.net import Net
from symbp.derivation.plan import build_plan
from symbp.emit.module import generate_module

ROOT = Path(__file__).resolve().parent.parent
EPS = float(np.finfo(np.float64).eps)


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def exact_steps(f):
    """``phi`` for :func:`estimate`: the function and the step taken (exact: no array)."""
    return lambda t: (f(t), t)


def check_1d(f, derivative, noise=None):
    center = f(0.0)
    if noise is None:
        noise = 5 * EPS * max(abs(center), 1.0)
    return estimate(exact_steps(f), center, derivative, noise)


# --------------------------------------------------------------------------- one variable


@pytest.mark.parametrize("length", [1e-1, 1e-2, 1e-3, 3e-4])
def test_strong_curvature_passes_and_a_relative_error_of_1e_4_fails(length):
    # f(t) = sin(t/L + 0.3): f'(0) = cos(0.3)/L. A central difference at the fixed step 1e-5
    # is off by (1e-5/L)**2/6, 1.1e-4 at L = 3e-4: far above the tolerance.
    def f(t):
        return math.sin(t / length + 0.3)

    derivative = math.cos(0.3) / length
    right = check_1d(f, derivative)
    assert right.error < TOLERANCE and not right.kink
    assert abs(right.numeric - derivative) < TOLERANCE * abs(derivative)
    wrong = check_1d(f, derivative * (1 + 1e-4))
    assert wrong.error > 5e-5 and not wrong.kink


@pytest.mark.parametrize("distance", [3e-4, 2e-5, 7.8e-6, 1.5e-6])
@pytest.mark.parametrize("side", [1, -1])
def test_a_kink_near_the_point_is_stepped_around(distance, side):
    # Slope 0.7 left of the kink at t = side * distance, 2.0 right of it, plus curvature.
    kink = side * distance

    def f(t):
        return 0.7 * t + 1.3 * max(t - kink, 0.0) + 0.4 * t * t

    derivative = 0.7 if kink > 0 else 2.0
    result = check_1d(f, derivative)
    assert result.error < TOLERANCE and not result.kink and result.refined
    # ... and near a kink a wrong derivative still fails: the smaller steps converge.
    assert check_1d(f, derivative * (1 + 1e-4)).error > 5e-5


@pytest.mark.parametrize("distance", [0.0, 1e-13, -2e-13, 4e-13])
def test_a_kink_within_the_smallest_step_is_reported_not_failed(distance):
    # At the kink itself the convention (ReLU'(0) = 0: the left slope) is no limit of
    # difference quotients; so close to it no step on the ladder resolves the two sides.
    def f(t):
        return 0.5 * t + 1.5 * max(t - distance, 0.0)

    assert gradcheck.STEPS[-1] / 2 > abs(distance)
    derivative = 0.5 if distance >= 0 else 2.0
    result = check_1d(f, derivative)
    assert result.kink


@pytest.mark.parametrize("distance", [1e-7, -2e-7, 7e-7, -3e-9])
def test_a_kink_a_little_further_is_resolved_by_the_smaller_steps(distance):
    # Kinks as close as a deep network behind batch norm puts them (1e-9 to 1e-6 at 32 blocks
    # of linear-batchnorm-relu at batch 4): the ladder goes on down to 1e-12.
    def f(t):
        return 0.5 * t + 1.5 * max(t - distance, 0.0) + 0.3 * t * t

    derivative = 0.5 if distance >= 0 else 2.0
    result = check_1d(f, derivative)
    assert result.error < TOLERANCE and not result.kink
    wrong = check_1d(f, derivative * (1 + 1e-4))
    assert wrong.error > TOLERANCE and not wrong.kink


@pytest.mark.parametrize("seed", [3, 13, 32, 0, 1])
def test_many_kinks_within_the_large_steps_are_stepped_under(seed):
    # A deep network behind batch norm at a small batch, in one variable: a line with 200 kinks
    # of random slope change between 3e-6 and 2e-5 from the point, on both sides. Steps above
    # that cross all of them: their central differences are all about 0.5 + (sum of the
    # changes) / 2, so the estimates at 1e-3 and 1e-4 agree with each other, while the slope at
    # the point is 0.5 + (sum of the changes left of it). The check once failed these (seeds 3,
    # 13 and 32, relative error 0.4); the steps from 1e-6 on see the slope at the point.
    rng = np.random.default_rng(seed)
    kinks = rng.uniform(-2e-5, 2e-5, 200)
    kinks = kinks[np.abs(kinks) > 3e-6]
    changes = rng.normal(0.0, 0.05, kinks.size)

    def f(t):
        return 0.5 * t + 0.2 * t * t + float(np.sum(changes * np.maximum(t - kinks, 0.0)))

    derivative = 0.5 + float(np.sum(changes[kinks < 0]))
    result = check_1d(f, derivative)
    assert result.error < TOLERANCE and not result.kink and result.refined
    wrong = check_1d(f, derivative * (1 + 1e-4))
    assert wrong.error > TOLERANCE and not wrong.kink


def test_the_denominator_guard_is_the_measured_rounding_noise():
    # A loss of size 2 with a tiny slope (1e-9) and an added noise of known size (1e-13 per
    # value, 500 times the loss's rounding): the difference quotients are noise-dominated.
    sigma = 1e-13

    def noise(t):
        digest = hashlib.sha256(np.float64(t).tobytes()).digest()
        return sigma * (int.from_bytes(digest[:8], "little") / 2**64 - 0.5) * math.sqrt(12)

    def f(t):
        return 2.0 + 1e-9 * t + noise(t)

    measured = rounding_noise(f, f(0.0))
    assert 2 * sigma < measured < 15 * sigma  # a bound of about 5 standard deviations
    assert check_1d(f, 1e-9, noise=measured).error < TOLERANCE
    # The guard is the noise and no more: a slope off by 50 times the noise's effect fails.
    assert check_1d(f, 1e-9 + 5e-8, noise=measured).error > TOLERANCE


def test_a_non_finite_loss_fails():
    result = check_1d(lambda t: math.inf if t > 0 else t, 1.0)
    assert result.error == math.inf


def test_a_step_lost_to_rounding_is_no_division_by_zero():
    # phi reports the step it really took; 0 happens where p + h == p.
    result = estimate(lambda t: (1.0, 0.0), 1.0, 2.0, 1e-16)
    assert result.error == math.inf


def test_entries_far_beyond_one_are_perturbed_in_proportion():
    # A PReLU slope of 1e17: 1e17 + 1e-3 == 1e17 in float64, so the check divided by zero.
    net = Net([symbp.linear(3), symbp.prelu(init=1e17), symbp.linear(2)], input_features=3,
              loss="mse")
    report = gradcheck.check_spec(net)
    assert report.passed, report.table()
    alpha = next(row for row in report.rows if row.name.endswith(".alpha"))
    assert alpha.checked == 1 and alpha.max_error < 1e-6


# --------------------------------------------------------------------------- modules


def wrong(module, change):
    """``module`` with ``loss_and_grads``/``backward`` returning ``change(grads)``."""
    proxy = types.SimpleNamespace(**vars(module))

    def loss_and_grads(*args, **kwargs):
        loss, grads = module.loss_and_grads(*args, **kwargs)
        return loss, change(dict(grads))

    proxy.loss_and_grads = loss_and_grads
    return proxy


def scaled(name, factor):
    def change(grads):
        grads[name] = grads[name] * factor
        return grads

    return change


#: Right modules on which check once failed (tests/test_codegen.py's CHECK_FALSE_FAILURES):
#: strong curvature, and a kink 7.8e-6 from the point. The ladder of steps must not make the
#: check blind there. (layers, input features, loss, batch, seed)
HARD = {
    "curvature": ([symbp.linear(2, bias=False), symbp.linear(5, bias=False),
                   symbp.linear(5, bias=False), symbp.batchnorm()], 2, "softmax_cross_entropy",
                  6, 4017),
    "kink_within_step": ([symbp.linear(9, bias=False), symbp.residual([symbp.linear(9)]),
                          symbp.rrelu(), symbp.residual([symbp.linear(9)]),
                          symbp.linear(1, bias=False), symbp.linear(9)], 2,
                         "softmax_cross_entropy", 2, 373),
    "mlp_bn_gelu": ([symbp.linear(6), symbp.batchnorm(), symbp.gelu(), symbp.linear(4),
                     symbp.relu(), symbp.linear(3)], 5, "mse", 4, 0),
}


@pytest.fixture(scope="module", params=sorted(HARD))
def hard(request):
    layers, features, loss, batch, seed = HARD[request.param]
    net = Net(layers, input_features=features, loss=loss)
    return net, load_module(generate_module(net)), batch, seed


def test_the_hard_modules_pass(hard):
    net, module, batch, seed = hard
    report = check_module(net, module, batch=batch, seed=seed)
    assert report.passed, report.table()


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["some", "every"])
def test_any_gradient_scaled_by_1_plus_1e_4_fails(hard, every):
    """Each gradient scaled in turn fails the check (every third by default, each one with -m
    slow: a check per gradient)."""
    net, module, batch, seed = hard
    params, x, y = make_inputs(net, module, batch=batch, seed=seed)
    loss, grads = module.loss_and_grads(params, x, y, rng=np.random.default_rng(seed + 1))
    # Scale each gradient whose entries are not all rounding noise of the loss (a batch norm
    # makes the gradient of the bias before it zero in exact arithmetic).
    names = [n for n, g in grads.items() if np.max(np.abs(g)) > 1e-8 * abs(loss)]
    assert len(names) >= 4
    for name in names if every else names[::3]:
        report = check_module(net, wrong(module, scaled(name, 1 + 1e-4)), batch=batch, seed=seed)
        failed = {row.name for row in report.rows if not row.passed}
        assert name in failed, report.table()
        assert failed <= {name} | {row.name for row in report.rows if row.name.startswith("vjp")}


def test_one_wrong_entry_fails_in_full_and_is_named():
    net = Net([symbp.linear(12), symbp.tanh(), symbp.linear(3)], input_features=10,
              loss="softmax_cross_entropy")
    module = load_module(generate_module(net))

    def change(grads):
        grads["linear1.W"] = grads["linear1.W"].copy()
        grads["linear1.W"][7, 5] *= 1 + 1e-4
        return grads

    report = check_module(net, wrong(module, change), full=True)
    (row,) = [r for r in report.rows if not r.passed and not r.name.startswith("vjp")]
    assert row.name == "linear1.W" and row.checked == 120 and row.worst.startswith("[7, 5]:")
    assert "worst linear1.W[7, 5]" in report.table()


def test_the_vjp_directions_see_a_wrong_entry_that_sampling_may_miss():
    net = Net([symbp.linear(40), symbp.sigmoid(), symbp.linear(2)], input_features=30,
              loss="bce_with_logits")
    module = load_module(generate_module(net))
    params, x, y = make_inputs(net, module, batch=4, seed=0)
    _, grads = module.loss_and_grads(params, x, y)
    largest = float(np.max(np.abs(grads["linear1.W"])))

    def change(grads):
        grads["linear1.W"] = grads["linear1.W"] + 0.01 * largest * (
            np.arange(1200).reshape(30, 40) == 517
        )
        return grads

    report = check_module(net, wrong(module, change))
    assert next(r for r in report.rows if r.name == "linear1.W").checked == SAMPLE
    directions = [row for row in report.rows if row.name.startswith("vjp")]
    assert directions and not any(row.passed for row in directions)


def test_samples_by_default_and_checks_every_entry_with_full():
    net = Net([symbp.linear(100), symbp.softplus(), symbp.linear(2)], input_features=10,
              loss="mse")
    module = load_module(generate_module(net))
    sampled = {row.name: row.checked for row in check_module(net, module).rows}
    full = {row.name: row.checked for row in check_module(net, module, full=True).rows}
    assert sampled["linear1.W"] == SAMPLE and full["linear1.W"] == 1000
    assert sampled["linear1.b"] == SAMPLE and full["linear1.b"] == 100
    assert sampled["linear3.b"] == full["linear3.b"] == 2


def test_relu_inputs_at_and_near_the_kink(monkeypatch):
    # ReLU straight on the input: entries of x at chosen distances from the kink at 0.
    net = Net([symbp.relu(), symbp.linear(3)], input_features=6, loss="mse")
    module = load_module(generate_module(net))
    original = gradcheck.make_inputs
    distances = np.array([0.0, 0.0, 7.8e-6, -7.8e-6, 3e-4, -3e-4])

    def inputs(net, module, *, batch, seed):
        params, x, y = original(net, module, batch=batch, seed=seed)
        x[0] = distances
        return params, x, y

    monkeypatch.setattr(gradcheck, "make_inputs", inputs)
    report = check_module(net, module, batch=3, seed=0)
    assert report.passed, report.table()
    row = next(row for row in report.rows if row.name == "x")
    assert row.kinks == 2  # exactly at 0: reported, not failed; the others are stepped around
    assert "2 at a kink, skipped" in report.table()


# --------------------------------------------------------------------------- command line


def test_cli_check_fails_a_subtly_wrong_generated_module(monkeypatch, capsys):
    # the generated module, with its input gradient scaled by 1 + 1e-4
    load = gradcheck.load_module
    monkeypatch.setattr(gradcheck, "load_module",
                        lambda source: wrong(load(source), scaled("x", 1 + 1e-4)))
    assert cli_main(["check", str(ROOT / "examples" / "mlp_bn.toml")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "worst x[" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isalnum()}
    assert "FAIL" in rows["x"] and "FAIL" not in rows["fc1.W"]


def test_the_same_check_gives_the_same_table():
    net = Net([symbp.linear(5), symbp.batchnorm(), symbp.rrelu(), symbp.linear(3)],
              input_features=4, loss="softmax_cross_entropy")
    module = load_module(generate_module(net))
    first = check_module(net, module, batch=3, seed=7)
    assert first.passed, first.table()
    assert check_module(net, module, batch=3, seed=7).table() == first.table()


# --------------------------------------------------------------------------- deep networks


def deep_net(blocks, width=64, leaky=None):
    """``deep_spec`` as a Net, block ``leaky`` (0-based) with a leaky ReLU instead of a ReLU:
    the one layer whose backward is ``leaky_relu_backward``."""
    stack = []
    for block in range(blocks):
        activation = symbp.leaky_relu(slope=0.1) if block == leaky else symbp.relu()
        stack += [symbp.linear(width), symbp.batchnorm(), activation]
    stack.append(symbp.linear(10))
    return Net(stack, input_features=width, loss="softmax_cross_entropy")


#: A wrong line in the generated leaky_relu_backward: the slope for negative inputs off by 1e-3.
LEAKY_LINE = "dx = np.where(x > 0, dy, slope*dy)"
LEAKY_WRONG = "dx = np.where(x > 0, dy, 1.001*slope*dy)"


def wrong_leaky(net):
    source = generate_module(net)
    assert source.count(LEAKY_LINE) == 1
    return load_module(source.replace(LEAKY_LINE, LEAKY_WRONG))


def failed_rows(report):
    return [row for row in report.rows if not row.passed and not row.name.startswith("vjp")]


def test_a_wrong_line_in_one_layers_backward_fails_that_layers_row_only():
    # 8 blocks; block 5's activation is the only leaky ReLU. Its generated backward is made
    # wrong (by construction: the slope of the negative side off by 1e-3); the layers' rows
    # check each layer against its own forward, so exactly the row of the gradient that layer
    # hands down fails, and names it. The module's other gradients are right given that
    # (wrong) upstream gradient: they come from the same chain, and their rows pass.
    net = deep_net(8, width=16, leaky=5)
    assert check_module(net, load_module(generate_module(net))).passed
    report = check_module(net, wrong_leaky(net))
    (row,) = failed_rows(report)
    assert (row.name, row.layer) == ("dbatchnorm17", "leaky_relu18")
    assert "backward of leaky_relu18" in report.table()


def test_a_wrong_sum_in_the_networks_backward_fails_the_layers_below_it():
    # The skip of res2 subtracted instead of added in the generated backward (a wrong network,
    # right layer functions): every layer's own row passes, the module's gradients below res2
    # fail (they are not the chain rule's any more), and a note says where they first differ.
    net = symbp.load_spec(ROOT / "examples" / "residual_mlp.toml")
    source = generate_module(net)
    assert source.count("dh = dskip_res2 + dh") == 1
    report = check_module(net, load_module(source.replace("dh = dskip_res2 + dh",
                                                          "dh = dskip_res2 - dh")))
    order = [step.name for step in build_plan(net).forward]
    below = set(order[: order.index("res1") + 1])  # res1 and what comes before it
    failed = failed_rows(report)
    assert failed and {row.layer for row in failed} <= below
    assert {row.name for row in failed} >= {"x", "stem.W", "res1_linear1.W"}
    assert all(row.passed for row in report.rows if row.name.startswith("d"))
    assert any("res1_batchnorm2.gamma differs from its layer functions chained" in note
               for note in report.notes)


def test_every_layer_has_rows_naming_its_backward():
    net = symbp.load_spec(ROOT / "examples" / "mlp_bn.toml")
    report = check_module(net, load_module(generate_module(net)))
    assert report.passed, report.table()
    layers = {row.layer for row in report.rows}
    assert {item.name for item in net.walk()} - {"out"} <= layers  # out: the loss's input
    assert "loss (softmax_cross_entropy)" in layers and "network" in layers
    assert next(r for r in report.rows if r.name == "dout").layer.startswith("loss")


def test_the_work_grows_linearly_with_depth():
    # Count the calls, not the time: the layer functions the layer rows evaluate, and the
    # whole-network evaluations of the network's rows. The old check ran the whole network
    # once per estimate, so doubling the depth doubled both the estimates and their cost.
    def calls(blocks):
        net = deep_net(blocks, width=16)
        module = load_module(generate_module(net))
        proxy = types.SimpleNamespace(**vars(module))
        counts = {"layers": 0, "network": 0}

        def counted(function, kind):
            def call(*args, **kwargs):
                counts[kind] += 1
                return function(*args, **kwargs)

            return call

        for name, value in vars(module).items():
            if name.endswith("_forward") and callable(value):
                setattr(proxy, name, counted(value, "layers"))
        proxy.forward = counted(module.forward, "network")
        proxy.loss_and_grads = counted(module.loss_and_grads, "network")
        assert check_module(net, proxy).passed
        return counts

    shallow, deep = calls(4), calls(8)
    assert 1.6 < deep["layers"] / shallow["layers"] < 2.5
    assert deep["network"] <= 1.3 * shallow["network"]


@pytest.mark.slow
def test_64_blocks_of_batch_norm_and_relu_pass_at_the_defaults_and_a_wrong_layer_is_named():
    # 64 blocks at batch 4: batch norm's gradient explosion (the input gradient is about 70 at
    # 16 blocks, 1e7 at 32 and 1e13 at 64) puts the ReLU kinks of the whole network below the
    # smallest step: finite differences of the whole loss see O(1)/step. The check once
    # failed 16, 32 and 64 blocks (PyTorch agrees with the module to 5e-12). One layer alone is
    # well conditioned: the right module passes at the defaults, ...
    net = deep_net(64, leaky=10)
    module = load_module(generate_module(net))
    report = check_module(net, module)
    assert report.passed, report.table()
    assert len(report.rows) > 3 * 64 and report.notes  # every layer; the note on the network
    # ... a wrong line in the backward of one layer 160 layers below the loss fails its row ...
    report = check_module(net, wrong_leaky(net))
    (row,) = failed_rows(report)
    assert (row.name, row.layer) == ("dbatchnorm32", "leaky_relu33")
    # ... and a gradient the module returns made wrong by 1e-3 still fails, deep or not.
    for name in ["x", "batchnorm32.gamma", "linear190.W"]:
        report = check_module(net, wrong(module, scaled(name, 1 + 1e-3)))
        assert {row.name for row in failed_rows(report)} == {name}, report.table()


def test_a_loss_too_rough_for_finite_differences_is_named_in_the_report():
    # What 64 blocks of linear -> batch norm -> relu at batch 4 look like to the check (the
    # loss, 2.3, changes by about 5 when x moves by 1e-11): a loss that moves by 0.05 at
    # random under the smallest changes of x. The table says why it cannot be checked.
    net = Net([symbp.linear(3), symbp.tanh(), symbp.linear(2)], input_features=3, loss="mse")
    module = load_module(generate_module(net))
    proxy = types.SimpleNamespace(**vars(module))

    def loss_and_grads(params, x, y, **kwargs):
        loss, grads = module.loss_and_grads(params, x, y, **kwargs)
        digest = hashlib.sha256(np.asarray(x).tobytes()).digest()
        return loss + 0.05 * (digest[0] / 255 - 0.5), grads

    proxy.loss_and_grads = loss_and_grads
    report = check_module(net, proxy)
    assert report.notes and "too large for finite differences" in report.table()
    assert not check_module(net, module).notes  # the module itself: no note


def test_a_network_that_overflows_is_reported_not_checked(recwarn):
    """An activation that overflows float64 at the check's inputs: one row naming the layer
    and a note saying why nothing was checked (it printed NumPy's RuntimeWarnings and nine rows
    of nan, with notes blaming the module's sums)."""
    net = symbp.Net(
        [symbp.activation("(min(x, 1) + max(x, 2))**5000", name="act"), symbp.linear(2)],
        input_features=3, loss="mse",
    )
    report = symbp.check(net)
    assert not report.passed
    assert [(row.name, row.layer) for row in report.rows] == [("forward", "act")]
    assert any("not finite" in note and "'act'" in note for note in report.notes)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
