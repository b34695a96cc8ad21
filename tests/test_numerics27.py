"""Numerical correctness of the generated code (issue 27, items 7-9), each against a truth that is
not symbp's own:

* max pooling with NaN: a plain loop that transcribes PyTorch's max-pooling rule (a value
  replaces the window's maximum so far when it is greater or NaN: NaN is the maximum and the
  last NaN of a window its arg-max; ATen's ``cpu_max_pool`` and the CUDA kernels);
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import symbp
from symbp.check.gradcheck import load_module
from symbp.declare.net import Net
from symbp.emit.module import _helper_source, environment, generate_module


@pytest.fixture(scope="module")
def helpers():
    namespace = {"np": np, "concurrent": concurrent, "math": math}
    env = environment()
    for name in ("parts", "window_max", "first_maxima", "first_argmax_mask", "first_max_col2im",
                 "col2im"):
        exec(_helper_source(env, name), namespace)  # noqa: S102 - our own template
    return namespace


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
