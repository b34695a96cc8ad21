"""Sliding windows over the last two axes, and the scatters that are their adjoints.

Contract: ``_windows`` and ``_window_rows`` are views of x (no copy);
``_col2im`` adds each window entry back where it was read (the adjoint of ``_windows``),
``_row_col2im`` does so for window rows (the adjoint of ``_window_rows``), and ``_shifted`` reads
at an offset with zeros outside. Every element of a result is written, threads or not
(``_in_parts``), to the same bits.
"""

import numpy as np

from .threads import _in_parts


def _windows(x, kernel, stride, dilation):
    """The view windows[..., p, q, i, j] = x[..., p*stride + i*dilation, q*stride + j*dilation]."""
    extent = tuple((k - 1) * dilation + 1 for k in kernel)
    view = np.lib.stride_tricks.sliding_window_view(x, extent, axis=(-2, -1))
    return view[..., ::stride, ::stride, ::dilation, ::dilation]


def _window_rows(x, kernel_rows, stride, dilation):
    """The view rows[..., p, i, w] = x[..., p*stride + i*dilation, w]."""
    extent = (kernel_rows - 1) * dilation + 1
    view = np.lib.stride_tricks.sliding_window_view(x, extent, axis=-2)
    return np.moveaxis(view[..., ::stride, :, ::dilation], -1, -2)


def _col2im(cols, kernel, stride, dilation):
    """Scatter-add window entries back to where they were read (the adjoint of reading windows).

    out[..., p*stride + i*dilation, q*stride + j*dilation] += cols[..., p, q, i, j]
    """
    *lead, rows, columns = cols.shape[:-2]
    cols = np.broadcast_to(cols, (*cols.shape[:-2], *kernel))
    height, width = _col2im_extent((rows, columns), kernel, stride, dilation)
    out = np.empty((*lead, height, width), dtype=cols.dtype)
    _in_parts(lambda part: _col2im_into(out[part], cols[part], stride, dilation), out)
    return out


def _col2im_extent(counts, kernel, stride, dilation):
    """The height and width _col2im gives for counts (rows, columns) of windows."""
    if dilation == 1 and kernel[0] == kernel[1] == stride:
        return tuple(count * stride for count in counts)
    return tuple((count - 1) * stride + (k - 1) * dilation + 1
                 for count, k in zip(counts, kernel, strict=True))


def _col2im_into(out, cols, stride, dilation):
    """_col2im's work, written into out (every element)."""
    *lead, rows, columns, kernel_rows, kernel_columns = cols.shape
    if dilation == 1 and kernel_rows == kernel_columns == stride:
        # Windows that tile the input without overlap: each kernel offset fills its own slice.
        for i, j in np.ndindex(kernel_rows, kernel_columns):
            out[..., i::stride, j::stride] = cols[..., i, j]
        return
    out[...] = 0
    height = out.shape[-2]
    # Each kernel column's entries are summed first into a strip as wide as the windows, whose
    # rows lie end to end in memory like the windows' own: those adds run over whole windows.
    strip = np.empty((*lead, height, columns), dtype=cols.dtype)
    reach = (rows - 1) * stride + 1
    for j in range(kernel_columns):
        # The first kernel row's entries are assigned and the rows they miss set to 0.
        if stride > 1:
            strip[...] = 0
        else:
            strip[..., rows:, :] = 0
        strip[..., :reach:stride, :] = cols[..., 0, j]
        for i in range(1, kernel_rows):
            top = i * dilation
            strip[..., top : top + reach : stride, :] += cols[..., i, j]
        left = j * dilation
        out[..., left : left + (columns - 1) * stride + 1 : stride] += strip


def _row_col2im(rows, height, stride, dilation):
    """out[..., p*stride + i*dilation, w] += rows[..., p, i, w]: the adjoint of _window_rows."""
    out = np.empty((*rows.shape[:-3], height, rows.shape[-1]), dtype=rows.dtype)
    _in_parts(lambda part: _row_col2im_into(out[part], rows[part], stride, dilation), out)
    return out


def _row_col2im_into(out, rows, stride, dilation):
    """_row_col2im's work, written into out (every element)."""
    *_, count, kernel_rows, _ = rows.shape
    reach = (count - 1) * stride + 1
    out[...] = 0
    for i in range(kernel_rows):
        top = i * dilation
        out[..., top : top + reach : stride, :] += rows[..., i, :]


def _shifted(a, offsets, sizes):
    """out[..., u, v] = a[..., u + offset_u, v + offset_v] over the last axes; 0 outside a."""
    lead = a.ndim - len(offsets)
    read, written = [...], [...]  # on each axis, a[start:stop] lands in out at start - offset
    for o, s, n in zip(offsets, sizes, a.shape[lead:], strict=True):
        start = min(max(o, 0), n)
        stop = max(min(o + s, n), start)
        read.append(slice(start, stop))
        written.append(slice(start - o, stop - o))
    if all(w == slice(0, s) for w, s in zip(written[1:], sizes, strict=True)):
        return a[tuple(read)]  # all inside a: a view
    out = np.zeros((*a.shape[:lead], *sizes), dtype=a.dtype)
    read, written = tuple(read), tuple(written)
    _in_parts(lambda part: np.copyto(out[part][written], a[part][read]), out)
    return out
