"""The numerical runtime (symbp/runtime/), each helper against a plain reference.

The helpers hold structure, not math (a matrix product in a chosen memory order, the scatter
that is the adjoint of reading windows, an arg-max indicator); each is compared here with a
reference that does the same thing the obvious way: ``np.tensordot``, ``np.add.at`` over
explicitly computed target positions, ``np.argmax`` (which returns the first maximum).
Generated modules hold copies of these functions (tests/test_runtime.py checks the copying).
"""

from __future__ import annotations

import math
import threading

import mpmath
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from symbp import runtime
from symbp.runtime.blocks import _add_blocks
from symbp.runtime.pooling import (
    _argmax_col2im,
    _first_argmax,
    _first_argmax_mask,
    _first_max_col2im,
    _window_max,
)
from symbp.runtime.products import (
    _banded_window_route,
    _cheaper_banded_scatter,
    _col2im_tensordot,
    _contiguous_run,
    _tensordot,
    _window_tensordot,
)
from symbp.runtime.rows import _along_rows, _row_vector
from symbp.runtime.special import _erf, _erfc
from symbp.runtime.stable import _sigmoid, _softplus
from symbp.runtime.threads import set_threads
from symbp.runtime.windows import _col2im, _shifted

RUNTIME = (runtime.threads, runtime.rows, runtime.stable, runtime.special, runtime.windows,
           runtime.pooling, runtime.products)
#: The helpers tests name in their parameters.
NAMED = {"_sigmoid": _sigmoid, "_softplus": _softplus, "_erf": _erf, "_erfc": _erfc}


def _operands(rng, dtype):
    """Pairs (a, b, axes_a, axes_b) in several memory layouts, window views among them."""
    x = rng.standard_normal((3, 2, 7, 6)).astype(dtype)
    windows = sliding_window_view(x, (3, 2), axis=(-2, -1))  # n, c, p, q, i, j
    kernel = rng.standard_normal((4, 2, 3, 2)).astype(dtype)
    dy = rng.standard_normal((3, 4, 5, 5)).astype(dtype)
    return [
        (kernel, windows, (1, 2, 3), (1, 4, 5)),  # a convolution's forward
        (dy, windows, (2, 0, 3), (2, 0, 3)),  # its kernel gradient, axes in a scrambled order
        (kernel, dy, (0,), (1,)),  # the input gradient's columns
        (dy.transpose(3, 1, 0, 2), kernel, (1,), (0,)),  # a transposed view
        (np.asfortranarray(rng.standard_normal((5, 4)).astype(dtype)),
         rng.standard_normal((4, 3)).astype(dtype), (1,), (0,)),
        (windows[:, :, ::2, ::2], rng.standard_normal((2, 3, 2)).astype(dtype),
         (1, 4, 5), (0, 1, 2)),  # a strided window view
    ]


@pytest.mark.parametrize("shape", [(784, 256), (3,), (64, 3, 3, 3), (0, 5), (2, 9000), ()])
def test_add_blocks_is_the_whole_sum_to_the_bit(shape):
    """out += term(W) a block at a time gives the bits of the one-pass sum (an element-wise
    term: each element's value is computed alone either way)."""
    rng = np.random.default_rng(0)
    out, w = rng.standard_normal(shape), rng.standard_normal(shape)
    expected = out + 0.3 * w

    def term(a, *, scale):
        return scale * a

    _add_blocks(out, term, w, scale=0.3)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(
    ("dtype", "size"), [(np.float32, 1024), (np.float64, 512), (np.float64, 2048)]
)
def test_row_vector_moves_page_multiple_vectors_to_a_longer_allocation(dtype, size):
    """A vector of 4 KiB, 8 KiB, ... comes back as an equal copy in its own allocation, whose
    size is not a multiple of 4 KiB (the case that made row-broadcast passes slow)."""
    v = np.random.default_rng(0).standard_normal(size).astype(dtype)
    got = _row_vector(v)
    assert got is not v and not np.shares_memory(got, v)
    assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v)
    assert got.base is not None and got.base.nbytes % 4096 != 0


@pytest.mark.parametrize(
    ("dtype", "size"), [(np.float32, 1000), (np.float64, 256), (np.float32, 7)]
)
def test_row_vector_hands_back_other_vectors_untouched(dtype, size):
    v = np.ones(size, dtype)
    assert _row_vector(v) is v


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("outer", [None, "a", "b"])
def test_tensordot_equals_numpys(dtype, outer):
    rng = np.random.default_rng(0)
    for a, b, axes_a, axes_b in _operands(rng, dtype):
        got = _tensordot(a, b, axes_a, axes_b, outer=outer)
        expected = np.tensordot(a.astype(np.float64), b.astype(np.float64), (axes_a, axes_b))
        assert got.shape == expected.shape and got.dtype == dtype
        tolerance = 1e-12 if dtype == np.float64 else 1e-5
        assert np.allclose(got, expected, rtol=tolerance, atol=tolerance)


def test_tensordot_of_an_empty_batch_is_empty():
    a, b = np.zeros((0, 3, 4)), np.ones((3, 4, 5))
    for outer in (None, "a", "b"):
        assert _tensordot(a, b, (1, 2), (0, 1), outer=outer).shape == (0, 5)
        assert _tensordot(b, a, (0, 1), (1, 2), outer=outer).shape == (5, 0)


def test_tensordot_puts_the_larger_free_part_outermost_in_memory():
    """A weight times a batch (the generated linear layer's W (D, F) and x (N, T, D)): the
    batch's free axes, the larger part, come outermost, so the caller's move of them to the
    front is C-ordered; outer= picks either order, a's on a tie (np.tensordot's)."""
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((8, 16)), rng.standard_normal((4, 6, 8))
    expected = np.tensordot(w, x, ((0,), (2,)))
    for outer, moved in [(None, (1, 2, 0)), ("b", (1, 2, 0)), ("a", (0, 1, 2))]:
        got = _tensordot(w, x, (0,), (2,), outer=outer)
        assert np.allclose(got, expected, rtol=1e-12, atol=1e-12)
        assert got.transpose(moved).flags.c_contiguous, outer
    # a weight's gradient from two batches (free parts 16 and 8): a's outermost, as np's
    dz, h = rng.standard_normal((4, 6, 16)), rng.standard_normal((4, 6, 8))
    assert _tensordot(dz, h, (0, 1), (0, 1)).flags.c_contiguous
    square = rng.standard_normal((4, 6, 8))
    assert _tensordot(h, square, (0, 1), (0, 1)).flags.c_contiguous  # a tie


def test_contiguous_run_measures_the_innermost_stretch():
    run = _contiguous_run
    a = np.zeros((4, 5, 6))
    assert run(a) == 120
    assert run(a[:, :, :3]) == 3
    assert run(a.transpose(0, 2, 1)) == 1
    assert run(a[:, :1, :]) == 6  # a length-1 axis does not break the stretch
    assert run(sliding_window_view(a, (2, 2), axis=(-2, -1))) == 2


def _col2im_reference(cols, kernel, stride, dilation):
    *lead, rows, columns, kh, kw = cols.shape
    height = (rows - 1) * stride + (kh - 1) * dilation + 1
    width = (columns - 1) * stride + (kw - 1) * dilation + 1
    out = np.zeros((*lead, height, width))
    for p in range(rows):
        for q in range(columns):
            for i in range(kh):
                for j in range(kw):
                    np.add.at(out, (..., p * stride + i * dilation, q * stride + j * dilation),
                              cols[..., p, q, i, j])
    return out


@pytest.mark.parametrize(
    "kernel, stride, dilation",
    [((3, 3), 1, 1), ((2, 3), 1, 1), ((3, 2), 2, 1), ((2, 2), 1, 2), ((3, 3), 2, 2),
     ((2, 2), 2, 1)],
)
def test_col2im_adds_each_entry_where_it_was_read(kernel, stride, dilation):
    rng = np.random.default_rng(1)
    cols = rng.standard_normal((2, 3, 4, 5, *kernel))
    got = _col2im(cols, kernel, stride, dilation)
    assert np.allclose(got, _col2im_reference(cols, kernel, stride, dilation), atol=1e-12)
    # The adjoint of reading windows: <windows(x), cols> = <x, col2im(cols)>.
    x = rng.standard_normal(got.shape)
    extent = [dilation * (k - 1) + 1 for k in kernel]
    windows = sliding_window_view(x, extent, axis=(-2, -1))[
        ..., ::stride, ::stride, ::dilation, ::dilation]
    assert np.isclose(np.sum(windows * cols), np.sum(x * got), rtol=1e-12)


def test_col2im_takes_columns_in_any_memory_order():
    rng = np.random.default_rng(2)
    memory = rng.standard_normal((3, 2, 2, 4, 5, 6))  # c, i, j, n, p, q
    cols = memory.transpose(3, 0, 4, 5, 1, 2)  # n, c, p, q, i, j
    got = _col2im(cols, (2, 2), 1, 1)
    assert np.allclose(got, _col2im_reference(cols, (2, 2), 1, 1), atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_first_argmax_mask_marks_the_first_maximum(stride):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(2, 3, 7, 8)).astype(float)  # many ties
    windows = sliding_window_view(x, (3, 2), axis=(-2, -1))[..., ::stride, ::stride, :, :]
    mask = _first_argmax_mask(windows)
    flat = windows.reshape(*windows.shape[:-2], -1)
    expected = np.zeros(flat.shape)
    np.put_along_axis(expected, flat.argmax(axis=-1)[..., None], 1.0, axis=-1)
    assert mask.shape == windows.shape
    assert np.array_equal(mask.reshape(flat.shape), expected)
    assert np.array_equal(_window_max(windows), flat.max(axis=-1))


@pytest.mark.parametrize(
    "kernel, stride, dilation, size",
    [((2, 2), 2, 1, (8, 10)), ((2, 2), 2, 1, (7, 9)), ((3, 3), 3, 1, (9, 9)),
     ((3, 3), 2, 1, (9, 8)), ((2, 3), 1, 1, (6, 7)), ((2, 2), 1, 2, (7, 7)),
     ((3, 2), 2, 1, (8, 8))],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_first_max_col2im_routes_each_window_gradient_to_its_first_maximum(
    kernel, stride, dilation, size, dtype
):
    """Max pooling's gradient: each window's g added at the position of its first maximum (in
    row-major kernel order, as np.argmax picks it), all else 0; the tiling (kernel = stride)
    and the overlapping layouts, ties everywhere (ReLU-like zeros), and the very bits of the
    mask-times-g-then-scatter it replaces."""
    rng = np.random.default_rng(4)
    x = np.maximum(rng.integers(-2, 3, size=(3, 2, *size)), 0).astype(dtype)  # many ties at 0
    extent = tuple((k - 1) * dilation + 1 for k in kernel)
    windows = sliding_window_view(x, extent, axis=(-2, -1))[
        ..., ::stride, ::stride, ::dilation, ::dilation]
    g = rng.standard_normal(windows.shape[:-2]).astype(dtype)
    got = _first_max_col2im(windows, g[..., None, None], kernel, stride, dilation)
    flat = windows.reshape(*windows.shape[:-2], -1)
    cols = np.zeros(flat.shape)
    np.put_along_axis(cols, flat.argmax(axis=-1)[..., None], g[..., None].astype(float), axis=-1)
    expected = _col2im_reference(cols.reshape(windows.shape), kernel, stride, dilation)
    assert got.dtype == dtype
    assert got.shape[-2] <= expected.shape[-2] and got.shape[-1] <= expected.shape[-1]
    # The tiling route's result stops after the last window (as _col2im's); nothing lands beyond.
    assert not expected[..., got.shape[-2]:, :].any() and not expected[..., got.shape[-1]:].any()
    expected = expected[..., : got.shape[-2], : got.shape[-1]]
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    assert np.allclose(got, expected, rtol=tolerance, atol=tolerance)
    composed = _col2im(
        _first_argmax_mask(windows) * g[..., None, None], kernel, stride, dilation)
    assert np.array_equal(got, composed)
    # Read from the kept arg-max positions (what max pooling's forward keeps): the same bits.
    kept = _argmax_col2im(_first_argmax(windows), g[..., None, None], kernel, stride, dilation)
    assert kept.dtype == dtype and np.array_equal(kept, got)
    assert np.array_equal(_first_argmax(windows, _window_max(windows)), _first_argmax(windows))


@pytest.mark.parametrize("kernel", [(2, 2), (3, 2), (1, 1), (16, 17)])
def test_first_argmax_is_the_row_major_position_of_the_first_maximum(kernel):
    """The position np.argmax gives over each flattened window (its first maximum), in the
    smallest unsigned type that holds K_h*K_w - 1 (uint8 up to 256 positions); with a NaN in a
    window, that window's last NaN, where _first_argmax_mask puts its 1 (PyTorch's pick)."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, size=(2, 3, 2 * kernel[0] + 1, 2 * kernel[1])).astype(float)
    windows = sliding_window_view(x, kernel, axis=(-2, -1))[..., ::2, ::2, :, :]
    flat = windows.reshape(*windows.shape[:-2], -1)
    got = _first_argmax(windows)
    assert got.dtype == (np.uint8 if kernel[0] * kernel[1] <= 256 else np.uint16)
    assert np.array_equal(got, flat.argmax(axis=-1))
    x[0, 0, 0, 0] = x[0, 1, 0, 1] = x[1, 2, 0, 0] = np.nan
    windows = sliding_window_view(x, kernel, axis=(-2, -1))[..., ::2, ::2, :, :]
    mask = _first_argmax_mask(windows).reshape(*windows.shape[:-2], -1)
    assert np.array_equal(_first_argmax(windows), mask.argmax(axis=-1))


def test_first_max_col2im_takes_a_g_that_varies_over_the_kernel_offsets():
    """g broadcast against the windows, window axes included: each offset reads its own g."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 8))
    windows = sliding_window_view(x, (2, 2), axis=(-2, -1))[..., ::2, ::2, :, :]
    g = rng.standard_normal((3, 4, 4, 2, 2))  # no batch axis, one value per kernel offset
    got = _first_max_col2im(windows, g, (2, 2), 2, 1)
    composed = _col2im(_first_argmax_mask(windows) * g, (2, 2), 2, 1)
    assert np.array_equal(got, composed)


# ------------------------------------------------------------------------- sigmoid, softplus
def _sigmoid_points(dense: bool):
    """Points from -800 to 800; ``dense``: five times as many (-m slow)."""
    grid, random = (4001, 20000) if dense else (801, 4000)
    x = np.concatenate([np.linspace(-800, 800, grid), np.linspace(-40, 40, grid),
                        np.geomspace(1e-300, 800, 500),
                        np.random.default_rng(7).uniform(0, 40, random)])
    return np.concatenate([x, -x])


@pytest.mark.parametrize("dense", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["points", "dense"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "exact"), [
    ("_sigmoid", lambda v: 1 / (1 + mpmath.exp(-v))),
    ("_softplus", lambda v: mpmath.log1p(mpmath.exp(v))),
])
def test_sigmoid_and_softplus_keep_relative_accuracy_without_overflow(name, exact, dtype, dense):
    """Within 2 ulp (float64; 3 in float32, whose exp and division round more coarsely) of
    the value computed with 40 digits, from -800 to 800 (both tails, where sigmoid is e**u or
    1 - e**-u and softplus e**u or u), with no overflow or invalid operation; 0 where the value
    is below the dtype's range; the dtype kept."""
    x = _sigmoid_points(dense).astype(dtype)
    with mpmath.workdps(40):
        expected = np.array([float(exact(mpmath.mpf(float(v)))) for v in x]).astype(dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        got = NAMED[name](x)
    assert got.dtype == dtype and got.shape == x.shape
    normal = np.abs(expected) >= np.finfo(dtype).tiny
    ulps = np.abs(got[normal].astype(float) - expected[normal]) / np.spacing(expected[normal])
    assert ulps.max() <= (2 if dtype == np.float64 else 3), (ulps.max(), x[normal][ulps.argmax()])
    assert np.all(got[expected == 0] == 0)
    assert np.all(np.abs(got[~normal]) <= 2 * np.finfo(dtype).tiny)


def test_sigmoid_and_softplus_at_the_limits_and_in_any_layout():
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0])
    assert np.array_equal(_sigmoid(special), [1, 0, np.nan, 0.5, 0.5], equal_nan=True)
    assert np.array_equal(_softplus(special), [np.inf, 0, np.nan, np.log(2), np.log(2)],
                          equal_nan=True)
    a = np.random.default_rng(10).standard_normal((4, 6)) * 5
    for name, plain in (("_sigmoid", lambda v: 1 / (1 + np.exp(-v))),
                        ("_softplus", lambda v: np.log1p(np.exp(v)))):
        assert np.allclose(NAMED[name](a.T), plain(a.T), rtol=1e-14, atol=0)  # a view
        assert NAMED[name](np.array(1.5)).shape == ()
        assert NAMED[name](np.arange(3)).dtype == np.float64


# ------------------------------------------------------------------------------ erf, erfc
#: The fits behind _erf and _erfc (symbp/runtime/special.py): what each approximates, over
#: which interval of its variable, at which degree.
ERF_FITS = {
    "_ERF_NEAR_0": ("erf(x)/x in x**2", (0, 1), 11),
    "_ERFCX_0": ("erfcx", (0.5, 1), 12),
    "_ERFCX_1": ("erfcx", (1, 2), 16),
    "_ERFCX_2": ("erfcx", (2, 4), 18),
    "_ERFCX_3": ("erfcx", (4, 6), 14),
    "_ERFCX_TAIL": ("x*erfcx(x) in 1/x**2", (1 / 27.3**2, 1 / 36), 10),
}


def _erf_fits():
    """The Chebyshev fits refitted with mpmath (50 digits), coefficients highest power first,
    in u = (2*v - lo - hi)/(hi - lo) over each interval."""
    functions = {
        "erf(x)/x in x**2": lambda s: mpmath.erf(mpmath.sqrt(s)) / mpmath.sqrt(s)
        if s else 2 / mpmath.sqrt(mpmath.pi),
        "erfcx": lambda x: mpmath.exp(x * x) * mpmath.erfc(x),
        "x*erfcx(x) in 1/x**2": lambda t: mpmath.exp(1 / t) * mpmath.erfc(1 / mpmath.sqrt(t))
        / mpmath.sqrt(t),
    }
    fits = {}
    with mpmath.workdps(50):
        for name, (kind, (lo, hi), degree) in ERF_FITS.items():
            lo, hi = mpmath.mpf(lo), mpmath.mpf(hi)

            def g(u, f=functions[kind], lo=lo, hi=hi):
                return f((hi - lo) / 2 * u + (lo + hi) / 2)

            fits[name] = [float(c) for c in mpmath.chebyfit(g, [-1, 1], degree + 1)]
    return fits


def test_erf_fits_are_the_chebyshev_fits_they_say():
    fits = _erf_fits()
    pieces = {f"_ERFCX_{k}": piece for k, piece in enumerate(runtime.special._ERFCX_PIECES)}
    for name, expected in fits.items():
        if name in pieces:
            lo, hi, got = pieces[name]
            assert (lo, hi) == ERF_FITS[name][1]
        else:
            got = getattr(runtime.special, name)
        assert np.allclose(got, expected, rtol=1e-12, atol=0), name
    assert runtime.special._ERFCX_TAIL_RANGE == ERF_FITS["_ERFCX_TAIL"][1]


def _erf_points():
    rng = np.random.default_rng(8)
    edges = np.array([0.5, 1.0, 2.0, 4.0, 6.0, 27.3])
    around = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 100)])
    x = np.concatenate([
        rng.standard_normal(20000) * 2, rng.uniform(-30, 30, 20000),
        np.geomspace(1e-310, 30, 3000), around, [0.0, 5e-324, 1e-20, 1000.0, 1e300],
    ])
    return np.concatenate([x, -x])


@pytest.mark.parametrize(("name", "reference", "most_ulps"),
                         [("_erf", math.erf, 2), ("_erfc", math.erfc, 5)])
def test_erf_and_erfc_agree_with_the_math_module(name, reference, most_ulps):
    """Within a few units in the last place of math.erf / math.erfc (glibc's, correct to about
    one) everywhere, piece edges included (subnormal results within one subnormal step), and
    exactly where the value is 1, -1 or 2, beyond 27.3 (0 for erfc) and at nan and +-inf."""
    x = _erf_points()
    got = NAMED[name](x)
    expected = np.array([reference(v) for v in x])
    assert got.dtype == np.float64 and got.shape == x.shape
    ulps = np.abs(got - expected) / np.spacing(np.abs(expected))
    assert ulps.max() <= most_ulps, (ulps.max(), x[ulps.argmax()])
    exact = np.isin(expected, [1.0, -1.0, 2.0]) | (np.abs(x) >= 27.3)
    assert np.array_equal(got[exact], expected[exact])
    special = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0])
    with np.errstate(all="raise"):
        values = NAMED[name](special)
    expected = [reference(v) for v in special]
    assert np.array_equal(values, expected, equal_nan=True)
    assert np.signbit(values[3]) == (name == "_erf")  # erf(-0.0) = -0.0


@pytest.mark.parametrize("name", ["_erf", "_erfc"])
def test_erf_keeps_the_dtype_and_shape_and_takes_any_layout(name):
    reference = {"_erf": math.erf, "_erfc": math.erfc}[name]
    x = np.random.default_rng(9).standard_normal((5, 7)) * 3
    got = NAMED[name](x.T.astype(np.float32))  # a transposed view
    expected = np.array([[reference(float(v)) for v in row] for row in x.T.astype(np.float32)])
    assert got.dtype == np.float32 and got.shape == (7, 5)
    assert np.array_equal(got, expected.astype(np.float32))
    assert NAMED[name](np.array(0.5)).shape == ()
    assert NAMED[name](np.arange(3)).dtype == np.float64


def test_erf_taylor_table_holds_erfs_taylor_coefficients():
    """Row k of float32's table at x0 = j/512 is erf^(k)(x0)/k!, by mpmath's own Taylor
    expansion of erf (numerical differentiation at 30 digits), at the ends and between."""
    table, step = runtime.special._ERF32_TAYLOR, runtime.special._ERF32_STEP
    assert table.shape == (5, 4 * step + 1)
    with mpmath.workdps(30):
        for j in (0, 1, 255, 512, 777, 1024, 1500, 2047, 2048):
            expected = [float(c) for c in mpmath.taylor(mpmath.erf, mpmath.mpf(j) / step, 4)]
            assert np.allclose(table[:, j], expected, rtol=1e-14, atol=1e-300), j


def _float32_points():
    """float32 numbers: every 499th one from 0 to 4.5 (a dense grid: 2.2 million), the table's
    points and their neighbours, around 4 (where float32's erf becomes 1), subnormals, random
    draws; both signs."""
    rng = np.random.default_rng(10)
    grid = np.arange(0, np.float32(4.5).view(np.int32), 499, dtype=np.int32).view(np.float32)
    nodes = (np.arange(0, 4 * 512 + 1) / 512).astype(np.float32)
    edges = np.concatenate([nodes, np.nextafter(nodes, 0), np.nextafter(nodes, 9)])
    x = np.concatenate([
        grid, edges, np.float32([1e-45, 1e-40, 1e-38, 3.9, 3.95, 4.5, 10, 3e38]),
        rng.standard_normal(50000).astype(np.float32) * 2,
        rng.uniform(-6, 6, 50000).astype(np.float32),
    ])
    return np.concatenate([x, -x])


def test_erf_in_float32_is_math_erf_rounded_to_float32():
    """float32's erf (a Taylor table evaluated in float64) equals math.erf rounded to float32
    on every point of a dense grid, edges and random draws; and at nan, +-inf, +-0."""
    x = _float32_points()
    got = _erf(x)
    expected = np.array([math.erf(v) for v in x.tolist()]).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == x.shape
    mismatch = got != expected
    assert not mismatch.any(), (mismatch.sum(), x[mismatch][:5])
    special = np.float32([np.inf, -np.inf, np.nan, -0.0, 0.0])
    with np.errstate(all="raise"):
        values = _erf(special)
    assert np.array_equal(values, np.float32([1, -1, np.nan, -0.0, 0]), equal_nan=True)
    assert np.signbit(values[3]) and not np.signbit(values[4])
    # a transposed view, and the shape of a 0-d array
    a = x[:60].reshape(6, 10)
    assert np.array_equal(_erf(a.T), expected[:60].reshape(6, 10).T)
    assert _erf(np.float32(0.5)).shape == ()


def _shifted_reference(a, offsets, sizes):
    out = np.zeros((*a.shape[:-2], *sizes))
    for u in range(sizes[0]):
        for v in range(sizes[1]):
            i, j = u + offsets[0], v + offsets[1]
            if 0 <= i < a.shape[-2] and 0 <= j < a.shape[-1]:
                out[..., u, v] = a[..., i, j]
    return out


# Banded products. Each case: (a, x, kernel, stride, dilation, axes_a, axes_windows), the product
# of a with the windows of x; the references are np.tensordot of a plain window view (and of
# the columns for the scatter), in float64.
def _window_cases(rng, dtype):
    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    W, x = arr(4, 3, 3, 2), arr(5, 3, 9, 8)  # a rectangular kernel
    return {
        "forward": (W, x, (3, 2), 1, 1, (1, 2, 3), (1, 4, 5)),
        "forward, strided and dilated": (W, x, (3, 2), 2, 2, (1, 2, 3), (1, 4, 5)),
        "kernel gradient": (arr(5, 4, 7, 7), x, (3, 2), 1, 1, (0, 2, 3), (0, 2, 3)),
        "kernel gradient, strided": (arr(5, 4, 4, 4), x, (3, 2), 2, 1, (0, 2, 3), (0, 2, 3)),
        "kernel gradient, dilated": (arr(5, 4, 5, 6), x, (3, 2), 1, 2, (0, 2, 3), (0, 2, 3)),
        "one channel, axes scrambled": (arr(6, 5, 5), arr(2, 9, 11), (5, 5), 1, 1, (1, 2), (4, 3)),
        "gather (flipped kernel)": (W[:, :, ::-1, ::-1], arr(5, 4, 9, 8), (3, 2), 1, 1,
                                    (0, 2, 3), (1, 4, 5)),
        "neither column axis summed": (arr(3, 3), x, (3, 2), 1, 1, (0, 1), (1, 4)),
        "both column axes summed": (arr(7, 2), x, (3, 2), 1, 1, (0, 1), (3, 5)),
    }


def _window_view(x, kernel, stride, dilation):
    extent = [dilation * (k - 1) + 1 for k in kernel]
    return sliding_window_view(x, extent, axis=(-2, -1))[
        ..., ::stride, ::stride, ::dilation, ::dilation]


def _force(monkeypatch, route):
    """The cost models of symbp/runtime/products.py made to answer route ("banded" or
    "im2col") always, for one test."""
    if route == "banded":
        monkeypatch.setattr(runtime.products, "_banded_window_route",
                            lambda size, shape, width, summed: (
            None if ("j" in summed) == ("q" in summed) else "j" if "j" in summed else "q"))
        monkeypatch.setattr(runtime.products, "_cheaper_banded_scatter", lambda *args: True)
    else:
        monkeypatch.setattr(runtime.products, "_banded_window_route", lambda *args: None)
        monkeypatch.setattr(runtime.products, "_cheaper_banded_scatter", lambda *args: False)


def _spy(monkeypatch, module, name):
    """The list of the arguments of each call the runtime makes to module.name, for one test."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *args, **kw: calls.append(args) or original(*args, **kw))
    return calls


@pytest.mark.parametrize("route", ["banded", "im2col"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_tensordot_equals_numpys_on_either_route(monkeypatch, route, dtype):
    _force(monkeypatch, route)
    calls = _spy(monkeypatch, runtime.products, "_shift")
    for name, (a, x, kernel, stride, dilation, axes_a, axes_w) in _window_cases(
            np.random.default_rng(7), dtype).items():
        calls.clear()
        got = _window_tensordot(a, x, kernel, stride, dilation, axes_a, axes_w)
        windows = _window_view(x.astype(np.float64), kernel, stride, dilation)
        expected = np.tensordot(a.astype(np.float64), windows, (axes_a, axes_w))
        assert got.shape == expected.shape and got.dtype == dtype, name
        tolerance = 1e-12 if dtype == np.float64 else 1e-4
        assert np.allclose(got, expected, rtol=tolerance, atol=tolerance), name
        # The banded route ran where it applies (one column axis summed), and only there.
        banded = route == "banded" and "column ax" not in name
        assert bool(calls) == banded, name


@pytest.mark.parametrize("chunks", [2, 3, "every sample"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_tensordot_in_batch_chunks_equals_numpys(monkeypatch, dtype, chunks):
    """im2col a chunk of the batch at a time (_CHUNK_BYTES set so that each case is cut into
    2 or 3 chunks, uneven ones among them, or one per sample): the same products, summed over
    the chunks where the batch is summed (the kernel gradient)."""
    _force(monkeypatch, "im2col")
    products = _spy(monkeypatch, runtime.products, "_tensordot")
    for name, (a, x, kernel, stride, dilation, axes_a, axes_w) in _window_cases(
            np.random.default_rng(9), dtype).items():
        windows = _window_view(x.astype(np.float64), kernel, stride, dilation)
        size = windows.size * np.dtype(dtype).itemsize
        chunk_bytes = 1 if chunks == "every sample" else size // chunks
        monkeypatch.setattr(runtime.products, "_CHUNK_BYTES", chunk_bytes)
        products.clear()
        got = _window_tensordot(a, x, kernel, stride, dilation, axes_a, axes_w)
        expected = np.tensordot(a.astype(np.float64), windows, (axes_a, axes_w))
        assert got.shape == expected.shape and got.dtype == dtype, name
        tolerance = 1e-12 if dtype == np.float64 else 1e-4
        assert np.allclose(got, expected, rtol=tolerance, atol=tolerance), name
        assert len(products) == (len(x) if chunks == "every sample" else min(chunks, len(x))), name


def _scatter_cases(rng):
    W, dy = rng.standard_normal((4, 3, 3, 2)), rng.standard_normal((5, 4, 7, 7))
    return {
        # cols[n, c, p, q, i, j] = sum_o W[o, c, i, j] dy[n, o, p, q], a convolution's input
        # gradient before its scatter
        "input gradient": (W, dy, (0,), (1,), (3, 0, 4, 5, 1, 2), (3, 2), 1, 1),
        "operands swapped": (dy, W, (1,), (0,), (0, 3, 1, 2, 4, 5), (3, 2), 1, 1),
        "strided": (W, dy[:, :, :4, :4], (0,), (1,), (3, 0, 4, 5, 1, 2), (3, 2), 2, 1),
        "dilated": (W, dy[:, :, :5, :6], (0,), (1,), (3, 0, 4, 5, 1, 2), (3, 2), 1, 2),
        "tiling": (W[:, :, :2], dy, (0,), (1,), (3, 0, 4, 5, 1, 2), (2, 2), 2, 1),
        # q and j both from W's side: only the im2col route applies
        "q and j from one operand": (rng.standard_normal((4, 6, 2)),
                                     rng.standard_normal((5, 4, 7, 3, 3)),
                                     (0,), (1,), (2, 4, 3, 0, 5, 1), (3, 2), 1, 1),
    }


@pytest.mark.parametrize("route", ["banded", "im2col"])
def test_col2im_tensordot_equals_the_scatter_of_the_product_on_either_route(monkeypatch, route):
    _force(monkeypatch, route)
    calls = _spy(monkeypatch, runtime.products, "_shift")
    for name, (a, b, axes_a, axes_b, order, kernel, stride, dilation) in _scatter_cases(
            np.random.default_rng(8)).items():
        calls.clear()
        got = _col2im_tensordot(a, b, axes_a, axes_b, order, kernel, stride, dilation)
        cols = np.tensordot(a, b, (axes_a, axes_b)).transpose(order)
        expected = _col2im_reference(cols, kernel, stride, dilation)
        assert got.shape == expected.shape, name
        assert np.allclose(got, expected, atol=1e-12), name
        assert bool(calls) == (route == "banded" and "one operand" not in name), name


@pytest.mark.parametrize(
    "shape_a, window_shape, width, summed, banded",
    [
        # LeNet's convolutions (examples/lenet.toml, batch 128): forward and kernel gradient
        # take the banded route, 0.6-0.7x the im2col time there (docs/conv.md)
        (150, (128, 1, 24, 24, 5, 5), 28, [1, "i", "j"], "j"),
        (2400, (128, 6, 8, 8, 5, 5), 12, [1, "i", "j"], "j"),
        (128 * 16 * 8 * 8, (128, 6, 8, 8, 5, 5), 12, [0, "p", "q"], "q"),
        # the wide net's 64 -> 64 channel 3x3 convolution on 32x32 images, batch 64: the band
        # would do 11x the multiply-adds (5x slower measured), so im2col
        (64 * 64 * 9, (64, 64, 32, 32, 3, 3), 34, [1, "i", "j"], None),
        (64 * 64 * 32 * 32, (64, 64, 32, 32, 3, 3), 34, [0, "p", "q"], None),
        # its first layer, 3 channels in: still im2col (the band multiplies work by 11)
        (64 * 3 * 9, (64, 3, 32, 32, 3, 3), 34, [1, "i", "j"], None),
    ],
)
def test_the_banded_route_is_taken_where_it_measured_faster(
        shape_a, window_shape, width, summed, banded):
    assert _banded_window_route(shape_a, window_shape, width, summed) == banded


@pytest.mark.parametrize(
    "sizes, shape_w, shape_dy, width, banded",
    [
        # LeNet's second convolution's input gradient (W 16x6x5x5, dy 128x16x8x8): banded,
        # 1.06 against 1.80 ms with the SkylakeX kernel (2.13 against 2.00 with Haswell's)
        ({"s0": 16, 1: 6, "i": 5, "j": 5, 0: 128, "p": 8, "q": 8}, (16, 6, 5, 5),
         (128, 16, 8, 8), 12, True),
        # the wide net's first (3 -> 64 channels, 3x3, 34 padded columns): im2col, 5.6 against
        # 16.9 ms banded
        ({"s0": 64, 1: 3, "i": 3, "j": 3, 0: 64, "p": 32, "q": 32}, (64, 3, 3, 3),
         (64, 64, 32, 32), 34, False),
    ],
)
def test_the_banded_scatter_is_taken_where_it_measured_faster(
        sizes, shape_w, shape_dy, width, banded):
    cheaper = _cheaper_banded_scatter
    kernel = shape_w[2:]
    assert cheaper(sizes, math.prod(shape_w), math.prod(shape_dy), True, ["s0"], kernel,
                   width) is banded


@pytest.mark.parametrize(
    "offsets, sizes",
    [((0, 0), (5, 6)), ((1, 2), (3, 3)), ((-2, -1), (9, 8)), ((-2, 1), (4, 4)),
     ((3, -1), (4, 9)), ((6, 0), (2, 2)), ((-5, -5), (3, 3))],
)
def test_shifted_reads_at_an_offset_with_zeros_outside(offsets, sizes):
    a = np.random.default_rng(4).standard_normal((2, 3, 5, 6))
    got = _shifted(a, offsets, sizes)
    assert got.shape == (2, 3, *sizes)
    assert np.array_equal(got, _shifted_reference(a, offsets, sizes))
    extents = zip(offsets, sizes, a.shape[-2:], strict=True)
    inside = all(o >= 0 and o + s <= n for o, s, n in extents)
    assert np.shares_memory(got, a) == inside  # a view where nothing is outside


_UFUNCS = (np.add, np.subtract, np.multiply, np.divide)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(4096, 256), (256, 1024), (257, 1024), (1000, 100), (3, 4), (16, 8192), (140000, 1),
     (0, 300), (300, 0)],
)
def test_along_rows_is_the_plain_broadcast_to_the_bit(dtype, shape):
    """Every ufunc, the vector on either side, new output or in place: the same numbers as
    NumPy broadcasting the vector along the rows, and the same dtype; leftover rows (257 rows
    taken 8 at a time) and the shapes that take the plain route (short, long rows, empty)."""
    rng = np.random.default_rng(1)
    along_rows = _along_rows
    a = rng.uniform(0.5, 2.0, shape).astype(dtype)
    v = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    for ufunc in _UFUNCS:
        for first, second in ((a, v), (v, a)):
            expected = ufunc(first, second)
            got = along_rows(ufunc, first, second)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(got, expected)
        inplace = a.copy()
        assert along_rows(ufunc, inplace, v, out=inplace) is inplace
        assert np.array_equal(inplace, ufunc(a, v))


def test_along_rows_takes_long_rows_and_leaves_other_layouts_to_numpy(monkeypatch):
    """The pass really runs on rows of at least np.getbufsize() numbers (a spy on the ufunc);
    a transposed view, a Fortran-ordered output and a small array go the plain way, with the
    right numbers."""
    rng = np.random.default_rng(2)
    along_rows = _along_rows
    a, v = rng.standard_normal((1000, 256)), rng.standard_normal(256)
    widths = []

    def spy(first, second, out=None):
        widths.append((np.shape(first), np.shape(second)))
        return np.multiply(first, second, out=out)

    assert np.array_equal(along_rows(spy, a, v), a * v)
    t = -(-np.getbufsize() // 256)
    assert widths == [((1000 // t, t * 256), (t * 256,)), ((1000 % t, 256), (256,))]
    widths.clear()
    at = rng.standard_normal((256, 1000)).T
    assert np.array_equal(along_rows(spy, at, v), at * v)
    out = np.empty((1000, 256), order="F")
    along_rows(spy, a, v, out=out)
    assert np.array_equal(out, a * v)
    small = rng.standard_normal((20, 256))
    assert np.array_equal(along_rows(spy, small, v), small * v)
    assert widths == [((1000, 256), (256,))] * 2 + [((20, 256), (256,))]


def _threaded(monkeypatch, part_size):
    """The runtime, for one test, with parts of at least part_size elements and a record of
    its calls: per call of _in_parts, the length of the axis it cuts and the parts it ran
    (first-axis slice, thread)."""
    monkeypatch.setattr(runtime.threads, "_PART_SIZE", part_size)
    calls = []
    in_parts = runtime.threads._in_parts

    def recording_in_parts(work, out):
        parts = []
        calls.append((len(out), parts))

        def recorded(part):
            parts.append((part, threading.get_ident()))
            work(part)

        in_parts(recorded, out)

    callers = [module for module in RUNTIME[1:] if getattr(module, "_in_parts", None) is in_parts]
    assert callers  # windows, pooling, products
    for module in callers:
        monkeypatch.setattr(module, "_in_parts", recording_in_parts)
    return calls


def _helper_calls(rng):
    x = rng.standard_normal((7, 3, 11, 10))
    windows = sliding_window_view(x, (3, 3), axis=(-2, -1))
    pooled = sliding_window_view(x[..., :10, :10], (2, 2), axis=(-2, -1))[..., ::2, ::2, :, :]
    kernel = rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal((7, 4, 9, 8))
    cols = rng.standard_normal((7, 4, 9, 8, 3, 3))
    return {
        "tensordot": lambda: _tensordot(windows, kernel, (1, 4, 5), (1, 2, 3)),
        "tensordot, kernel gradient": lambda: _tensordot(dy, windows, (0, 2, 3), (0, 2, 3)),
        "col2im": lambda: _col2im(cols, (3, 3), 1, 1),
        "col2im, tiling": lambda: _col2im(pooled, (2, 2), 2, 1),
        "window_max": lambda: _window_max(pooled),
        "first_argmax_mask": lambda: _first_argmax_mask(np.round(windows)),
        "first_max_col2im": lambda: _first_max_col2im(
            np.round(windows), cols[:, :3], (3, 3), 1, 1),
        "first_max_col2im, tiling": lambda: _first_max_col2im(
            np.round(pooled), pooled[..., 0, 0, None, None], (2, 2), 2, 1),
        "shifted": lambda: _shifted(dy, (-2, -2), (13, 12)),
        "window_tensordot": lambda: _window_tensordot(
            kernel, x, (3, 3), 1, 1, (1, 2, 3), (1, 4, 5)),
        "window_tensordot, kernel gradient": lambda: _window_tensordot(
            dy, x, (3, 3), 1, 1, (0, 2, 3), (0, 2, 3)),
        "col2im_tensordot": lambda: _col2im_tensordot(
            kernel, dy, (0,), (1,), (3, 0, 4, 5, 1, 2), (3, 3), 1, 1),
    }


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_bits_and_really_run_in_parts(monkeypatch, threads):
    calls = _threaded(monkeypatch, part_size=64)
    try:
        for name, call in _helper_calls(np.random.default_rng(6)).items():
            set_threads(1)
            expected = call()
            set_threads(threads)
            calls.clear()
            got = call()
            assert got.dtype == expected.dtype and np.array_equal(got, expected), name
            assert calls, name
            for length, parts in calls:
                bounds = sorted(part.indices(length)[:2] for part, _ in parts)
                assert len(bounds) == threads, name  # the first axis cut in `threads` parts
                assert bounds[0][0] == 0 and bounds[-1][1] == length, name
                assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)), name
                # The caller runs one part, the pool the others (a pool thread may run two).
                assert threading.get_ident() in {thread for _, thread in parts}, name
                assert len({thread for _, thread in parts}) >= 2, name
    finally:
        set_threads(1)


def test_small_work_stays_in_the_calling_thread(monkeypatch):
    calls = _threaded(monkeypatch, part_size=2**20)
    set_threads(2)
    try:
        top = _window_max(np.ones((4, 3, 5, 5, 2, 2)))
        assert np.array_equal(top, np.ones((4, 3, 5, 5)))
        # One part, the whole axis, run inline in the calling thread.
        assert calls == [(4, [(slice(None), threading.get_ident())])]
    finally:
        set_threads(1)


@pytest.mark.parametrize("count", [0, -1, 1.5, True, "2", None])
def test_set_threads_refuses_what_is_not_a_positive_int(count):
    with pytest.raises(ValueError, match="positive int"):
        set_threads(count)
