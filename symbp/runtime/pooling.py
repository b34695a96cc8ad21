"""Max pooling's kernels: window maxima, the first maximum of each window, and the gradient
routed to it.

Contract: over windows whose last two axes are the kernel offsets, ``_window_max`` is each
window's maximum, ``_first_argmax_mask`` is 1 at each window's first maximum (row-major order)
and 0 elsewhere, and ``_first_max_col2im`` is ``_col2im(mask*g, ...)`` for that mask, computed
without making the mask or the product as arrays. ``_first_argmax`` is the row-major position
``i*K_w + j`` of each window's first maximum, in the smallest unsigned integer type that holds
``K_h*K_w - 1`` (what a forward pass keeps); ``_argmax_col2im`` is ``_first_max_col2im`` read
from those positions: the same mask, the same products, the same bits.
"""

import numpy as np

from .threads import _in_parts
from .windows import _col2im


def _window_max(windows):
    """The maximum of each window (last two axes), one element-wise pass per kernel offset."""
    out = np.empty(windows.shape[:-2], dtype=windows.dtype)
    _in_parts(lambda part: _window_max_into(out[part], windows[part]), out)
    return out


def _window_max_into(out, windows):
    """_window_max's work, written into out."""
    first, *offsets = np.ndindex(windows.shape[-2:])
    np.copyto(out, windows[(..., *first)])
    for i, j in offsets:
        np.maximum(out, windows[..., i, j], out=out)


def _first_maxima(windows, top=None):
    """(i, j, first) for each kernel offset of the windows (last two axes) in row-major order:
    first is True for the windows whose arg-max lies at offset (i, j): the first maximum, or in
    a window that holds a NaN (whose maximum is NaN), its last NaN, as PyTorch's max pooling
    picks it (it takes each value that is greater than the maximum so far, or NaN).

    One bool array, overwritten from one offset to the next: use it before taking the next.
    top: the windows' maxima where the caller has them (_window_max's), else computed here.
    """
    if top is None:
        top = np.empty(windows.shape[:-2], dtype=windows.dtype)
        _window_max_into(top, windows)
    taken = np.zeros(top.shape, dtype=bool)
    first = np.empty(top.shape, dtype=bool)
    last_nan = _last_nan_offsets(windows, top)
    for i, j in np.ndindex(windows.shape[-2:]):
        np.equal(windows[..., i, j], top, out=first)  # never where the maximum is NaN
        np.greater(first, taken, out=first)  # a maximum, and none earlier in its window
        if last_nan is not None:
            first |= last_nan == i * windows.shape[-1] + j
        yield i, j, first
        taken |= first


def _last_nan_offsets(windows, top):
    """For each window, the row-major position i*K_w + j of its last NaN (-1 where it holds
    none); None when no window holds a NaN (top, their maxima, has none: one pass over it)."""
    if top.size == 0 or not np.isnan(top.max()):
        return None
    last = np.full(top.shape, -1, dtype=np.intp)
    for i, j in np.ndindex(windows.shape[-2:]):
        np.copyto(last, i * windows.shape[-1] + j, where=np.isnan(windows[..., i, j]))
    return last


def _first_argmax_mask(windows):
    """1 at the first maximum of each window (last two axes, row-major order), 0 elsewhere.

    The mask is laid out in memory kernel offset by kernel offset, (..., K_h, K_w, P, Q): each
    offset's entries are one block, and products with per-window arrays run over whole blocks.
    """
    *lead, rows, columns, height, width = windows.shape
    mask = np.empty((*lead, height, width, rows, columns), dtype=windows.dtype)  # all written
    mask = np.moveaxis(mask, (-4, -3), (-2, -1))
    _in_parts(lambda part: _first_argmax_mask_into(mask[part], windows[part]), mask)
    return mask


def _first_argmax_mask_into(mask, windows):
    """_first_argmax_mask's work, written into mask."""
    for i, j, first in _first_maxima(windows):
        mask[..., i, j] = first


def _first_max_col2im(windows, g, kernel, stride, dilation):
    """Each window's g (broadcast against the windows) added where the window's first maximum
    was read, 0 elsewhere: max pooling's gradient, _col2im(mask*g, kernel, stride, dilation)
    for the 0/1 mask of first maxima, with neither the mask nor the product made as an array.
    """
    *lead, rows, columns = windows.shape[:-2]
    g = np.broadcast_to(g, windows.shape)
    dtype = np.result_type(windows, g)
    tiling = dilation == 1 and kernel[0] == kernel[1] == stride
    if tiling:  # windows without overlap: each kernel offset's entries fill their own slice
        out = np.empty((*lead, rows * stride, columns * stride), dtype=dtype)
    else:  # the columns, laid out kernel offset by kernel offset, then scatter-added
        out = np.empty((*lead, *kernel, rows, columns), dtype=dtype)
        out = np.moveaxis(out, (-4, -3), (-2, -1))
    _in_parts(lambda part: _first_max_into(
        out[part], windows[part], g[part], stride if tiling else None), out)
    return out if tiling else _col2im(out, kernel, stride, dilation)


def _first_max_into(out, windows, g, stride):
    """_first_max_col2im's work: for each kernel offset (i, j), g where the windows' first
    maximum lies there and 0 elsewhere, written into out[..., i::stride, j::stride] (windows
    that tile out) or, with stride None, into the columns out[..., i, j]."""
    for i, j, first in _first_maxima(windows):
        target = out[..., i, j] if stride is None else out[..., i::stride, j::stride]
        np.multiply(first, g[..., i, j], out=target)


def _first_argmax(windows, top=None):
    """The row-major position i*K_w + j of each window's first maximum (last two axes), as
    _first_maxima takes it, in the smallest unsigned integer type that holds K_h*K_w - 1;
    top: the windows' maxima (_window_max's), where the caller has them."""
    rows, columns = windows.shape[-2:]
    out = np.zeros(windows.shape[:-2], dtype=np.min_scalar_type(max(rows * columns - 1, 0)))
    if top is None:
        _in_parts(lambda part: _first_argmax_into(out[part], windows[part], None), out)
    else:
        _in_parts(lambda part: _first_argmax_into(out[part], windows[part], top[part]), out)
    return out


def _first_argmax_into(out, windows, top):
    """_first_argmax's work, added into out (zeros): one window's first maximum is at one
    offset, so each offset's position times its 0/1 flags sets the windows it holds."""
    flags = np.empty(out.shape, dtype=out.dtype)
    for i, j, first in _first_maxima(windows, top):
        if i or j:
            np.multiply(first, out.dtype.type(i * windows.shape[-1] + j), out=flags)
            out |= flags


def _argmax_col2im(argmax, g, kernel, stride, dilation):
    """Each window's g (broadcast against the windows) added where the window's arg-max
    (its row-major kernel offset in argmax) was read, 0 elsewhere: _col2im(mask*g, kernel,
    stride, dilation) for the 0/1 mask argmax == i*K_w + j, with neither the mask nor the
    product made as an array."""
    *lead, rows, columns = argmax.shape
    g = np.broadcast_to(g, (*argmax.shape, *kernel))
    tiling = dilation == 1 and kernel[0] == kernel[1] == stride
    if tiling:  # windows without overlap: each kernel offset's entries fill their own slice
        out = np.empty((*lead, rows * stride, columns * stride), dtype=g.dtype)
    else:  # the columns, laid out kernel offset by kernel offset, then scatter-added
        out = np.empty((*lead, *kernel, rows, columns), dtype=g.dtype)
        out = np.moveaxis(out, (-4, -3), (-2, -1))
    _in_parts(lambda part: _argmax_into(
        out[part], argmax[part], g[part], stride if tiling else None), out)
    return out if tiling else _col2im(out, kernel, stride, dilation)


def _argmax_into(out, argmax, g, stride):
    """_argmax_col2im's work: for each kernel offset (i, j), g where the windows' arg-max is
    i*K_w + j and 0 elsewhere, written into out[..., i::stride, j::stride] (windows that tile
    out) or, with stride None, into the columns out[..., i, j]."""
    first = np.empty(argmax.shape, dtype=bool)
    for i, j in np.ndindex(g.shape[-2:]):
        np.equal(argmax, i * g.shape[-1] + j, out=first)
        target = out[..., i, j] if stride is None else out[..., i::stride, j::stride]
        np.multiply(first, g[..., i, j], out=target)
