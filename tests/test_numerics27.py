"""Numerical correctness of the generated code (issue 27, items 7-9), each against a truth that is
not symbp's own:

* max pooling with NaN: a plain loop that transcribes PyTorch's max-pooling rule (a value
  replaces the window's maximum so far when it is greater or NaN: NaN is the maximum and the
  last NaN of a window its arg-max; ATen's ``cpu_max_pool`` and the CUDA kernels);
* softmax cross-entropy at large logits: the exact gradient at 60 digits (mpmath), and the
  known softmax of tied maxima;
* max/min ties in user expressions: one-sided finite differences of the generated forward (the
  derivative at a tie lies between them) and ReLU'(0) = 0 where one side is a constant.
"""

from __future__ import annotations

import math
import os
from unittest import mock

import mpmath
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import symbp
from symbp.checking.gradcheck import load_module
from symbp.cli import main as cli_main
from symbp.declare.net import Net
from symbp.emit.module import generate_module
from symbp.runtime.pooling import _first_argmax_mask, _first_max_col2im, _window_max


@pytest.fixture(scope="module")
def helpers():
    """The max-pooling helpers generated modules copy (symbp/runtime/pooling.py)."""
    return {"_window_max": _window_max, "_first_argmax_mask": _first_argmax_mask,
            "_first_max_col2im": _first_max_col2im}


# -- item 8: NaN in a max-pooling window ---------------------------------------------------------
def _torch_max_pool(x, kernel, stride, dilation=1):
    """PyTorch's max pooling (no padding) as its kernels loop: per window, in row-major order,
    a value replaces the maximum so far (start: -inf at the window's first position) when it is
    greater or NaN. Returns the output and, per window, the input position of its arg-max."""
    *lead, height, width = x.shape
    kh, kw = kernel
    rows = (height - (kh - 1) * dilation - 1) // stride + 1
    columns = (width - (kw - 1) * dilation - 1) // stride + 1
    out = np.empty((*lead, rows, columns), dtype=x.dtype)
    where = np.empty((*lead, rows, columns, 2), dtype=int)
    for lead_index in np.ndindex(*lead):
        for p in range(rows):
            for q in range(columns):
                best, at = -math.inf, (p * stride, q * stride)
                for i in range(kh):
                    for j in range(kw):
                        u, v = p * stride + i * dilation, q * stride + j * dilation
                        value = float(x[(*lead_index, u, v)])
                        if value > best or math.isnan(value):
                            best, at = value, (u, v)
                out[(*lead_index, p, q)] = best
                where[(*lead_index, p, q)] = at
    return out, where


def _torch_max_pool_backward(x, where, g):
    dx = np.zeros(x.shape)
    for index in np.ndindex(*g.shape):
        lead = index[:-2]
        dx[(*lead, *where[index])] += g[index]
    return dx


def _with_nans(rng, shape, dtype):
    """Ties (ReLU-like zeros), single NaNs, and windows with two or more NaNs."""
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(dtype)
    x[rng.random(shape) < 0.15] = np.nan
    x[..., :2, :2] = np.nan  # a window (or several) full of NaN
    x[..., -1, -1] = np.inf
    return x


@pytest.mark.parametrize(
    "kernel, stride, dilation, size",
    [((2, 2), 2, 1, (8, 10)), ((3, 3), 3, 1, (9, 9)), ((3, 3), 2, 1, (9, 8)),
     ((2, 3), 1, 1, (6, 7)), ((2, 2), 1, 2, (7, 7)), ((3, 2), 2, 1, (8, 8))],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_helpers_route_a_nan_window_to_its_nan_as_pytorch(
    helpers, kernel, stride, dilation, size, dtype
):
    """Tiling (kernel = stride) and overlapping windows: the forward is NaN where a window holds
    one, and the gradient goes where PyTorch's arg-max is (its last NaN); nothing is dropped."""
    rng = np.random.default_rng(27)
    x = _with_nans(rng, (3, 2, *size), dtype)
    extent = tuple((k - 1) * dilation + 1 for k in kernel)
    windows = sliding_window_view(x, extent, axis=(-2, -1))[
        ..., ::stride, ::stride, ::dilation, ::dilation]
    expected_out, where = _torch_max_pool(x, kernel, stride, dilation)
    assert np.isnan(expected_out).any() and not np.isnan(expected_out).all()
    out = helpers["_window_max"](windows)
    np.testing.assert_array_equal(out, expected_out)  # NaN where expected, equal elsewhere
    g = rng.standard_normal(out.shape).astype(dtype)
    got = helpers["_first_max_col2im"](windows, g[..., None, None], kernel, stride, dilation)
    expected = _torch_max_pool_backward(x, where, g.astype(float))[
        ..., : got.shape[-2], : got.shape[-1]]
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert np.isclose(got.sum(), g.astype(float).sum(), rtol=tolerance)  # every window's g lands
    mask = helpers["_first_argmax_mask"](windows)
    assert np.array_equal(mask.sum(axis=(-2, -1)), np.ones(out.shape))


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 1)])
def test_generated_max_pool_matches_pytorch_on_nan_input(kernel, stride):
    """The generated module, forward and backward, against the PyTorch-rule reference."""
    net = Net([symbp.maxpool2d(kernel, stride=stride), symbp.flatten()],
              input_shape=(2, 6, 6), loss=None)
    module = load_module(generate_module(net), f"nan_pool_{kernel}_{stride}")
    rng = np.random.default_rng(8)
    x = _with_nans(rng, (2, 2, 6, 6), np.float64)
    out, cache = module.forward({}, x)
    expected_out, where = _torch_max_pool(x, (kernel, kernel), stride)
    np.testing.assert_array_equal(out, expected_out.reshape(2, -1))
    g = rng.standard_normal(out.shape)
    grads = module.backward({}, cache, g)
    expected = _torch_max_pool_backward(x, where, g.reshape(expected_out.shape))
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-12, atol=1e-12)


# -- item 7: softmax cross-entropy with large logits ---------------------------------------------
def _identity_net(classes):
    """One linear layer that the tests give W = I, b = 0: its output is x exactly, and the
    input gradient is the gradient of the loss with respect to the logits, exactly."""
    net = Net([symbp.linear(classes, name="fc")], input_features=classes,
              loss="softmax_cross_entropy")
    return load_module(generate_module(net), f"softmax_{classes}")


def _exact_gradient(z, y):
    """(softmax(z) - onehot(y))/N at 60 digits, from the float values of z."""
    mpmath.mp.dps = 60
    rows = []
    for row, label in zip(z.astype(float).tolist(), y.tolist(), strict=True):
        peak = max(row)
        exps = [mpmath.exp(mpmath.mpf(v) - mpmath.mpf(peak)) for v in row]
        total = mpmath.fsum(exps)
        rows.append([e / total - (1 if c == label else 0) for c, e in enumerate(exps)])
    n = len(rows)
    return [[value / n for value in row] for row in rows]


def _gradient_error(got, exact):
    """max |got - exact| / max |exact|, in high precision."""
    worst = max(abs(mpmath.mpf(float(g)) - e) for gr, er in zip(got, exact, strict=True)
                for g, e in zip(gr, er, strict=True))
    return float(worst / max(abs(e) for row in exact for e in row))


@pytest.mark.parametrize(
    "dtype, scale, bound",
    [(np.float64, 1.0, 1e-15), (np.float64, 1e12, 1e-15), (np.float64, 1e16, 1e-15),
     (np.float32, 1.0, 3e-7), (np.float32, 1e3, 3e-7), (np.float32, 1e4, 3e-7),
     (np.float32, 1e30, 3e-7)],
)
def test_softmax_cross_entropy_gradient_keeps_full_precision_at_large_logits(dtype, scale, bound):
    """Logits around +-scale with differences of order 1: the input gradient within a few ulp
    of the exact (softmax - onehot)/N of the same float logits (PyTorch: 3e-8 in float32).
    Before, it came from exp(z - lse) with lse rounded at the logits' magnitude: 1.6e-5 at
    1e12 and 0.5 at 1e16 in float64, 1.5e-5 at 1e3 and 1e-4 at 1e4 in float32."""
    classes, batch = 7, 16
    module = _identity_net(classes)
    params = {"fc.W": np.eye(classes, dtype=dtype), "fc.b": np.zeros(classes, dtype=dtype)}
    rng = np.random.default_rng(7)
    offsets = rng.standard_normal((batch, classes)) * 3
    signs = np.where(rng.random((batch, 1)) < 0.5, -1.0, 1.0)
    x = (signs * scale + offsets).astype(dtype)
    y = rng.integers(0, classes, size=batch)
    _, grads = module.loss_and_grads(params, x, y)
    assert grads["x"].dtype == dtype
    assert _gradient_error(grads["x"], _exact_gradient(x, y)) < bound


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_splits_tied_maxima_exactly(dtype):
    """Two tied maxima far above the rest: softmax (1/2, 1/2, 0, 0), so with N = 3 the
    gradient of a row labelled 3 is (1/6, 1/6, 0, -1/3); it was (1/3, 1/3, 0, -1/3)."""
    module = _identity_net(4)
    big = 1e16 if dtype == np.float64 else 1e30
    params = {"fc.W": np.eye(4, dtype=dtype), "fc.b": np.zeros(4, dtype=dtype)}
    x = np.array([[big, big, 0.0, -big], [big, big, 0.0, -big], [0.0, 0.0, 0.0, 0.0]],
                 dtype=dtype)
    _, grads = module.loss_and_grads(params, x, np.array([3, 0, 3]))
    exact = np.array([[1 / 6, 1 / 6, 0, -1 / 3], [-1 / 6, 1 / 6, 0, 0],
                      [1 / 12, 1 / 12, 1 / 12, -1 / 4]])
    np.testing.assert_allclose(grads["x"], exact, rtol=4 * np.finfo(dtype).eps, atol=0)


# -- item 9: max/min ties in user expressions ----------------------------------------------------
#: (expression, a point where two or more of its max/min arguments tie, whether two tie): both
#: sides of each tie depend on x, so the derivative there is a share of the tied arguments'.
TIES = [
    ("max(x, 0.3*x)", 0.0, True),
    ("max(x, x**2)", 1.0, True),
    ("max(x, x**2)", 0.0, True),
    ("min(x, 2*x)", 0.0, True),
    ("min(x**3, x)", 1.0, True),
    ("min(x**2, 2*x)", 2.0, True),
    ("max(x**2, 3*x - 2) + x", 2.0, True),
    ("max(x, 2*x, 3*x)", 0.0, False),
]
#: Ties with a constant keep ReLU'(0) = 0 (PyTorch's relu, relu6, hardtanh): derivative 0.
CONSTANT_TIES = [("max(x, 0)", 0.0), ("max(0, x)", 0.0), ("min(max(x, 0), 6)", 6.0),
                 ("min(x, 1)", 1.0)]


def _one_sided(forward, point, h=2.0**-20):
    """Left and right difference quotients of forward at point (forward: floats -> floats)."""
    value = forward(point)
    return (value - forward(point - h)) / h, (forward(point + h) - value) / h


def _activation_module(expr, tag):
    net = Net([symbp.activation(expr, name="act")], input_features=1, loss=None)
    module = load_module(generate_module(net), f"tie_{tag}")

    def forward(point):
        return float(module.forward({}, np.array([[point]]))[0][0, 0])

    def derivative(point):
        _, cache = module.forward({}, np.array([[point]]))
        return float(module.backward({}, cache, np.ones((1, 1)))["x"][0, 0])

    return forward, derivative


def _derive_expr_derivative(capsys, expr, forward):
    """The whole-array backward line `symbp derive --expr` prints, as a function of x (dy = 1;
    y, which it may read instead of x, from forward), unwrapped: on a terminal this wide."""
    with mock.patch.dict(os.environ, {"COLUMNS": "10000"}):
        assert cli_main(["derive", "--expr", expr]) == 0
    out = capsys.readouterr().out
    (line,) = [s.strip() for s in out.splitlines() if s.strip().startswith("dx = ")]
    code = line.removeprefix("dx = ")

    def derivative(point):
        names = {"np": np, "x": np.array([point]), "y": np.array([forward(point)]),
                 "dy": np.ones(1)}
        return float(eval(code, names)[0])  # noqa: S307 - symbp's own printed code

    return derivative


@pytest.mark.parametrize(("expr", "point", "pair"), TIES)
def test_a_tie_of_max_or_min_gets_a_derivative_between_its_one_sided_ones(
    capsys, expr, point, pair
):
    """At a tie the derivative lies within the one-sided derivatives (measured by one-sided
    finite differences of the generated forward), in the generated module and in `symbp
    derive --expr`; a tie of two arguments gets their mean, as torch.maximum's autograd."""
    forward, derivative = _activation_module(expr, TIES.index((expr, point, pair)))
    left, right = _one_sided(forward, point)
    assert abs(left - right) > 0.1  # a real kink
    low, high = min(left, right) - 1e-5, max(left, right) + 1e-5
    printed = _derive_expr_derivative(capsys, expr, forward)
    for value in (derivative(point), printed(point)):
        assert low <= value <= high
        if pair:
            assert value == pytest.approx((left + right) / 2, abs=1e-5)


@pytest.mark.parametrize(("expr", "point"), CONSTANT_TIES)
def test_a_tie_with_a_constant_keeps_relu_convention(capsys, expr, point):
    """max(x, 0) at 0 (and relu6's bounds) keep derivative 0, the constant's side, as
    PyTorch's relu; the one-sided derivatives are 0 and 1, so 0 lies between them."""
    forward, derivative = _activation_module(expr, f"c{CONSTANT_TIES.index((expr, point))}")
    left, right = _one_sided(forward, point)
    assert sorted([round(left, 6), round(right, 6)]) == [0, 1]
    assert derivative(point) == 0
    assert _derive_expr_derivative(capsys, expr, forward)(point) == 0
