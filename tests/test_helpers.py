"""The generated modules' array helpers (templates/helpers.py.j2), each against a plain reference.

The helpers hold structure, not math (a matrix product in a chosen memory order, the scatter
that is the adjoint of reading windows, an arg-max indicator); each is compared here with a
reference that does the same thing the obvious way: ``np.tensordot``, ``np.add.at`` over
explicitly computed target positions, ``np.argmax`` (which returns the first maximum).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from symbp.emit.module import _helper_source, environment


@pytest.fixture(scope="module")
def helpers():
    env = environment()
    namespace = {"np": np}
    for name in ("window_max", "first_argmax_mask", "col2im", "tensordot"):
        exec(_helper_source(env, name), namespace)  # noqa: S102 - our own template
    return namespace


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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tensordot_equals_numpys(helpers, dtype):
    rng = np.random.default_rng(0)
    for a, b, axes_a, axes_b in _operands(rng, dtype):
        got = helpers["_tensordot"](a, b, axes_a, axes_b)
        expected = np.tensordot(a.astype(np.float64), b.astype(np.float64), (axes_a, axes_b))
        assert got.shape == expected.shape and got.dtype == dtype
        tolerance = 1e-12 if dtype == np.float64 else 1e-5
        assert np.allclose(got, expected, rtol=tolerance, atol=tolerance)


def test_tensordot_of_an_empty_batch_is_empty(helpers):
    a, b = np.zeros((0, 3, 4)), np.ones((3, 4, 5))
    assert helpers["_tensordot"](a, b, (1, 2), (0, 1)).shape == (0, 5)
    assert helpers["_tensordot"](b, a, (0, 1), (1, 2)).shape == (5, 0)


def test_contiguous_run_measures_the_innermost_stretch(helpers):
    run = helpers["_contiguous_run"]
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
def test_col2im_adds_each_entry_where_it_was_read(helpers, kernel, stride, dilation):
    rng = np.random.default_rng(1)
    cols = rng.standard_normal((2, 3, 4, 5, *kernel))
    got = helpers["_col2im"](cols, kernel, stride, dilation)
    assert np.allclose(got, _col2im_reference(cols, kernel, stride, dilation), atol=1e-12)
    # The adjoint of reading windows: <windows(x), cols> = <x, col2im(cols)>.
    x = rng.standard_normal(got.shape)
    extent = [dilation * (k - 1) + 1 for k in kernel]
    windows = sliding_window_view(x, extent, axis=(-2, -1))[
        ..., ::stride, ::stride, ::dilation, ::dilation]
    assert np.isclose(np.sum(windows * cols), np.sum(x * got), rtol=1e-12)


def test_col2im_takes_columns_in_any_memory_order(helpers):
    rng = np.random.default_rng(2)
    memory = rng.standard_normal((3, 2, 2, 4, 5, 6))  # c, i, j, n, p, q
    cols = memory.transpose(3, 0, 4, 5, 1, 2)  # n, c, p, q, i, j
    got = helpers["_col2im"](cols, (2, 2), 1, 1)
    assert np.allclose(got, _col2im_reference(cols, (2, 2), 1, 1), atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_first_argmax_mask_marks_the_first_maximum(helpers, stride):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(2, 3, 7, 8)).astype(float)  # many ties
    windows = sliding_window_view(x, (3, 2), axis=(-2, -1))[..., ::stride, ::stride, :, :]
    mask = helpers["_first_argmax_mask"](windows)
    flat = windows.reshape(*windows.shape[:-2], -1)
    expected = np.zeros(flat.shape)
    np.put_along_axis(expected, flat.argmax(axis=-1)[..., None], 1.0, axis=-1)
    assert mask.shape == windows.shape
    assert np.array_equal(mask.reshape(flat.shape), expected)
    assert np.array_equal(helpers["_window_max"](windows), flat.max(axis=-1))
