"""The JAX target's window helpers (symbp/emit/jax_printer.py): the routes through
jax.lax.conv_general_dilated (_window_conv, _col2im_conv) compute the same contraction as the
general route (jnp.tensordot over the strided windows, _col2im of the product), which is the
definition the derivation's formulas print. Oracle: the general route, evaluated directly, and
JAX's own convolution and its autodiff for the layout the generated modules use."""

import functools
import itertools
import random

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from symbp.emit.jax_printer import HELPER_SOURCES  # noqa: E402


@pytest.fixture(scope="module")
def helpers():
    namespace = {"jax": jax, "jnp": jnp}
    for source in HELPER_SOURCES.values():
        exec(source, namespace)  # the text the generated modules copy
    return namespace


def _general_window(h, a, x, kernel, stride, dilation, axes_a, axes_windows):
    windows = h["_windows"](x, kernel, stride, dilation)
    return jnp.tensordot(a, windows, axes=(list(axes_a), list(axes_windows)))


def _general_col2im(h, a, b, axes_a, axes_b, order, kernel, stride, dilation):
    product = jnp.tensordot(a, b, axes=(list(axes_a), list(axes_b))).transpose(order)
    return h["_col2im"](product, kernel, stride, dilation)


def _close(actual, expected, atol=1e-10, single=False):
    """Equal to atol (float64), or to float32's rounding: 1e-5 of the largest value."""
    assert actual.shape == expected.shape
    if single:
        assert actual.dtype == jnp.float32
        atol = 1e-5 * float(jnp.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected), rtol=0,
                               atol=atol)


def _in_float32(helper, *args):
    """helper with its array arguments in float32 (the module's convolution routes)."""
    return helper(*[a.astype(jnp.float32) if isinstance(a, jax.Array) else a for a in args])


def _conv(x, weight, stride, dilation):
    """JAX's own convolution (NCHW, OIHW), the oracle of the forward."""
    return jax.lax.conv_general_dilated(x, weight, (stride, stride), "VALID",
                                        rhs_dilation=(dilation, dilation))


def _cases(count=12, seed=0):
    """Random conv shapes: batch 1 included, strides 1-2, dilations 1-2, rectangular kernels,
    inputs zero-padded (as the modules pad them) or not, sizes the stride does not divide."""
    rng = random.Random(seed)
    fixed = [(1, 1, 1, (5, 5), 1, 1, 0), (2, 3, 4, (2, 3), 2, 1, 1), (3, 2, 5, (3, 2), 1, 2, 2),
             (1, 4, 3, (3, 3), 2, 2, 1)]
    drawn = [(rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 5),
              (rng.randint(1, 4), rng.randint(1, 4)), rng.randint(1, 2), rng.randint(1, 2),
              rng.randint(0, 2)) for _ in range(count - len(fixed))]
    rs = np.random.default_rng(seed)
    for n, c, o, kernel, stride, dilation, padding in fixed + drawn:
        x = rs.normal(size=(n, c, rng.randint(9, 13), rng.randint(8, 12)))
        x = np.pad(x, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
        yield jnp.asarray(x), o, kernel, stride, dilation, rs


def _out_size(x, kernel, stride, dilation):
    return [(s - (k - 1) * dilation - 1) // stride + 1
            for s, k in zip(x.shape[2:], kernel, strict=True)]


def test_forward_route_equals_the_general_route_and_lax_conv(helpers):
    for x, o, kernel, stride, dilation, rs in _cases():
        weight = jnp.asarray(rs.normal(size=(o, x.shape[1], *kernel)))
        args = (kernel, stride, dilation, (1, 2, 3), (1, 4, 5))
        fast = helpers["_window_conv"](weight, x, *args)
        assert fast is not None
        _close(fast, _general_window(helpers, weight, x, *args))
        # the generated module's conv2d: out[o, n, p, q] transposed to [n, o, p, q]
        _close(fast.transpose(1, 0, 2, 3), _conv(x, weight, stride, dilation))
        # the module takes the route in float32 (in float64: im2col, faster on XLA's CPU)
        _close(_in_float32(helpers["_window_tensordot"], weight, x, *args), fast, single=True)


def test_forward_route_with_the_weight_axes_in_another_order(helpers):
    x, o, kernel, stride, dilation, rs = next(_cases(seed=3))
    weight = rs.normal(size=(o, x.shape[1], *kernel))
    # weight stored as [i, o, j, c]: contracted axes (3, 0, 2) with windows' (c, i, j)
    stored = jnp.asarray(weight.transpose(2, 0, 3, 1))
    args = (kernel, stride, dilation, (3, 0, 2), (1, 4, 5))
    fast = helpers["_window_conv"](stored, x, *args)
    assert fast is not None
    _close(fast, _general_window(helpers, stored, x, *args))


def test_weight_gradient_route_equals_the_general_route_and_autodiff(helpers):
    for x, o, kernel, stride, dilation, rs in _cases(seed=1):
        dy = jnp.asarray(rs.normal(size=(x.shape[0], o, *_out_size(x, kernel, stride, dilation))))
        args = (kernel, stride, dilation, (0, 2, 3), (0, 2, 3))
        fast = helpers["_window_conv"](dy, x, *args)
        assert fast is not None
        _close(fast, _general_window(helpers, dy, x, *args))
        weight = jnp.asarray(rs.normal(size=(o, x.shape[1], *kernel)))
        _, vjp = jax.vjp(functools.partial(_conv, x, stride=stride, dilation=dilation),
                         weight)
        _close(fast, vjp(dy)[0])
        _close(_in_float32(helpers["_window_tensordot"], dy, x, *args), fast, single=True)


def test_input_gradient_route_equals_the_general_route_and_autodiff(helpers):
    for x, o, kernel, stride, dilation, rs in _cases(seed=2):
        weight = jnp.asarray(rs.normal(size=(o, x.shape[1], *kernel)))
        dy = jnp.asarray(rs.normal(size=(x.shape[0], o, *_out_size(x, kernel, stride, dilation))))
        # the generated conv2d's dx: tensordot(W, dy) over o, [c, i, j, n, p, q] -> [n, c, p, q,
        # i, j]; and the same with the operands swapped
        for a, b, axes_a, axes_b, order in [(weight, dy, (0,), (1,), (3, 0, 4, 5, 1, 2)),
                                            (dy, weight, (1,), (0,), (0, 3, 1, 2, 4, 5))]:
            args = (a, b, axes_a, axes_b, order, kernel, stride, dilation)
            fast = helpers["_col2im_conv"](*args)
            assert fast is not None
            _close(fast, _general_col2im(helpers, *args))
            _close(_in_float32(helpers["_col2im_tensordot"], *args), fast, single=True)
        # autodiff's dx covers x's rows and columns that no window reads with zeros
        _, vjp = jax.vjp(lambda v, w=weight, s=stride, d=dilation: _conv(v, w, s, d), x)
        (expected,) = vjp(dy)
        rows, columns = fast.shape[2:]
        _close(fast, expected[:, :, :rows, :columns])
        assert not expected[:, :, rows:].any() and not expected[:, :, :, columns:].any()


def test_the_routes_run_under_jit(helpers):
    x, o, kernel, stride, dilation, rs = next(_cases(seed=4))
    weight = jnp.asarray(rs.normal(size=(o, x.shape[1], *kernel)))
    args = (kernel, stride, dilation, (1, 2, 3), (1, 4, 5))
    jitted = jax.jit(lambda w, v: helpers["_window_tensordot"](w, v, *args))
    _close(jitted(weight, x), _general_window(helpers, weight, x, *args))


def test_other_contractions_take_the_general_route(helpers):
    rs = np.random.default_rng(5)
    x = jnp.asarray(rs.normal(size=(2, 3, 7, 7)))
    kernel = (3, 3)
    # not a convolution: a depthwise-like contraction (c kept), a single-window-axis sum
    a3 = jnp.asarray(rs.normal(size=(3, 3, 3)))
    assert helpers["_window_conv"](a3, x, kernel, 1, 1, (1, 2), (4, 5)) is None
    a4 = jnp.asarray(rs.normal(size=(2, 3, 3, 3)))
    args = (kernel, 1, 1, (0, 1, 2), (0, 1, 4))
    assert helpers["_window_conv"](a4, x, *args) is None
    _close(helpers["_window_tensordot"](a4, x, *args), _general_window(helpers, a4, x, *args),
           atol=0)
    # a kernel broadcast from size 1 (as pooling's routing passes it) is no convolution
    g = jnp.asarray(rs.normal(size=(2, 3, 5, 5)))
    w = jnp.asarray(rs.normal(size=(3, 3, 1, 1)))
    assert helpers["_col2im_conv"](w, g, (0,), (1,), (3, 0, 4, 5, 1, 2), kernel, 1, 1) is None
    _close(helpers["_col2im_tensordot"](w, g, (0,), (1,), (3, 0, 4, 5, 1, 2), kernel, 1, 1),
           _general_col2im(helpers, w, g, (0,), (1,), (3, 0, 4, 5, 1, 2), kernel, 1, 1),
           atol=0)
    # the index roles mixed between operands
    for order in itertools.islice(itertools.permutations(range(6)), 1, 40):
        w = jnp.asarray(rs.normal(size=(3, 3, 3, 3)))
        g = jnp.asarray(rs.normal(size=(3, 3, 3, 3)))
        assert helpers["_col2im_conv"](w, g, (0,), (1,), order, kernel, 1, 1) is None
