"""Tensor contractions as BLAS matrix products, over plain arrays and over sliding windows.

Contract: ``_tensordot(a, b, axes_a, axes_b)`` is ``np.tensordot(a, b, (axes_a, axes_b))``;
``_window_tensordot`` is that product with the windows of x (``_windows``) as second operand,
and ``_col2im_tensordot`` the ``_col2im`` of a product's transpose. Each chooses how to compute
(memory order, im2col or banded route, batch chunks) from the shapes alone, by the cost models
here; the value is the same sums whichever route.
"""

import math

import numpy as np

from .threads import _in_parts
from .windows import _col2im, _col2im_extent, _row_col2im, _window_rows, _windows


def _tensordot(a, b, axes_a, axes_b, outer=None):
    """np.tensordot(a, b, (axes_a, axes_b)) as one matrix product (BLAS).

    Each operand becomes a matrix by the one copy that reads its memory in the longest runs
    (BLAS takes either operand transposed); the contracted axes follow the larger operand.
    The result's memory has the free axes of operand ``outer`` ("a" or "b") outermost; by
    default those of the operand with more free elements (a's on a tie, np.tensordot's
    order). In the generated W-times-x products, b's are the batch and positions, which the
    caller then moves to the front: with them inner, the transformer benchmark's float32 step
    took 1.4x as long, in the element-wise passes and einsums reading the results (symbp's
    docs/speed.md). The convolution routes below keep "a" (their callers' channel-major
    layout: an all-convolutional net's step took 1.13x as long with "b").
    """
    pairs = sorted(zip(axes_a, axes_b, strict=True), key=lambda pair: pair[a.size < b.size])
    axes_a, axes_b = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    free_a = [axis for axis in range(a.ndim) if axis not in axes_a]
    free_b = [axis for axis in range(b.ndim) if axis not in axes_b]
    rows, columns = _as_matrix(a, free_a, axes_a), _as_matrix(b, axes_b, free_b)
    if outer == "b" or (outer is None and columns.shape[1] > rows.shape[0]):
        product = (columns.T @ rows.T).T  # b's free axes outermost in memory
    else:
        product = rows @ columns
    # one tuple: every axis contracted leaves the shape (), which reshape() alone refuses
    return product.reshape((*[a.shape[k] for k in free_a], *[b.shape[k] for k in free_b]))


def _as_matrix(a, rows, columns):
    """a as a matrix over (rows, columns): a copy in that axis order, or the transpose of one."""
    shape = tuple(math.prod(a.shape[k] for k in axes) for axes in (rows, columns))
    direct, flipped = a.transpose(*rows, *columns), a.transpose(*columns, *rows)
    if _contiguous_run(flipped) > _contiguous_run(direct):
        return _contiguous(flipped).reshape(shape[::-1]).T
    return _contiguous(direct).reshape(shape)


def _contiguous(a):
    """a itself if its memory is one C-ordered block, else a copy that is."""
    if a.flags.c_contiguous:
        return a
    out = np.empty(a.shape, dtype=a.dtype)
    _in_parts(lambda part: np.copyto(out[part], a[part]), out)
    return out


def _contiguous_run(a):
    """How many elements the innermost axes of a span in one contiguous stretch of memory."""
    run, step = 1, a.itemsize
    for size, stride in zip(a.shape[::-1], a.strides[::-1], strict=True):
        if size == 1:
            continue
        if stride != step:
            break
        run, step = run * size, step * size
    return run


#: The banded route is taken when its estimated cost is lower, an array element copied or
#: scattered counting as _MACS_PER_ELEMENT multiply-adds of a matrix product (measured on
#: this project's convolutions: docs/conv.md).
_MACS_PER_ELEMENT = 50


def _labelled_product(a, labels_a, b, labels_b, summed):
    """_tensordot(a, b) over the axes labelled summed, and the labels of its axes."""
    axes_a = [labels_a.index(label) for label in summed]
    axes_b = [labels_b.index(label) for label in summed]
    labels = [label for label in (*labels_a, *labels_b) if label not in summed]
    return _tensordot(a, b, axes_a, axes_b, outer="a"), labels


def _shift(kernel_columns, columns, width, stride, dilation, dtype):
    """shift[j, q, w] = 1 where w == q*stride + j*dilation, else 0."""
    j = np.arange(kernel_columns)[:, None, None]
    q = np.arange(columns)[None, :, None]
    return (np.arange(width) == q * stride + j * dilation).astype(dtype)


def _window_tensordot(a, x, kernel, stride, dilation, axes_a, axes_windows):
    """np.tensordot(a, windows, (axes_a, axes_windows)) over the sliding windows of x,
    windows[..., p, q, i, j] = x[..., p*stride + i*dilation, q*stride + j*dilation].

    Two routes to the same sums; the cheaper for these shapes is taken (docs/conv.md):
    - im2col: the windows copied as one matrix, one matrix product (_chunked_tensordot);
    - banded, when one of the column axes q, j is summed and the other is not: only the
      window rows rows[..., p, i, w] = x[..., p*stride + i*dilation, w] are copied, and the
      column offsets go through the 0/1 tensor shift[j, q, w] = (w == q*stride + j*dilation):
      with j summed, a is multiplied by shift first (a banded matrix) and the product sums
      over w; with q summed, the product keeps q and w and its diagonals are gathered after.
    """
    lead = list(range(x.ndim - 2))
    window_labels = [*lead, "p", "q", "i", "j"]
    labels_a = [window_labels[axes_windows[axes_a.index(k)]] if k in axes_a else f"a{k}"
                for k in range(a.ndim)]
    summed = [window_labels[m] for m in axes_windows]
    counts = [(size - (k - 1) * dilation - 1) // stride + 1
              for size, k in zip(x.shape[-2:], kernel, strict=True)]
    window_shape = (*x.shape[:-2], *counts, *kernel)
    route = _banded_window_route(a.size, window_shape, x.shape[-1], summed)
    if route is None:
        return _chunked_tensordot(a, _windows(x, kernel, stride, dilation), axes_a, axes_windows)
    rows = _window_rows(x, kernel[0], stride, dilation)
    rows_labels = [*lead, "p", "i", "w"]
    shift = _shift(kernel[1], counts[1], x.shape[-1], stride, dilation, np.result_type(a, x))
    shift_labels = ["j", "q", "w"]
    if route == "j":
        band, band_labels = _labelled_product(a, labels_a, shift, shift_labels, ["j"])
        summed_rows = [label for label in summed if label != "j"] + ["w"]
        out, labels = _labelled_product(rows, rows_labels, band, band_labels, summed_rows)
    else:
        summed_rows = [label for label in summed if label != "q"]
        out, labels = _labelled_product(a, labels_a, rows, rows_labels, summed_rows)
        out, labels = _labelled_product(out, labels, shift, shift_labels, ["q", "w"])
    expected = [label for label in (*labels_a, *window_labels) if label not in summed]
    return out.transpose([labels.index(label) for label in expected])


def _banded_window_route(size_a, window_shape, width, summed):
    """The summed column axis ("j" or "q") when the banded route costs less, else None."""
    *lead, rows, columns, kernel_rows, kernel_columns = window_shape
    if ("j" in summed) == ("q" in summed):
        return None
    sizes = dict(zip([*range(len(lead)), "p", "q", "i", "j"], window_shape, strict=True))
    free = math.prod(size for label, size in sizes.items() if label not in summed)
    summed_size = math.prod(sizes[label] for label in summed)
    row_elements = math.prod(lead) * rows * kernel_rows * width
    im2col = math.prod(window_shape) + size_a * free / _MACS_PER_ELEMENT
    if "j" in summed:  # the band, then the product over (..., w)
        macs = size_a * columns * width + size_a * width * free / kernel_columns
    else:  # the product keeping q and w, then the diagonal gather
        macs = size_a * free * width / kernel_columns
        macs += size_a * columns * free * width / max(summed_size, 1)
    banded = row_elements + macs / _MACS_PER_ELEMENT
    return ("j" if "j" in summed else "q") if banded < im2col else None


#: Window matrices of more bytes than this are copied and multiplied a batch chunk at a time,
#: so that the product reads each chunk's copy from the cache it was just written to
#: (docs/conv.md).
_CHUNK_BYTES = 2**22


def _chunked_tensordot(a, windows, axes_a, axes_windows):
    """_tensordot(a, windows, axes_a, axes_windows), the windows copied a chunk of their first
    (batch) axis at a time: the chunks' products are added up where that axis is summed, and
    written into their slices of the result where it is free."""
    count = min(len(windows), math.prod(windows.shape) * windows.itemsize // _CHUNK_BYTES)
    if count < 2:
        return _tensordot(a, windows, axes_a, axes_windows, outer="a")
    size = len(windows)
    first, *rest = [slice(size * k // count, size * (k + 1) // count) for k in range(count)]
    if 0 in axes_windows:  # the batch is summed
        batch = (slice(None),) * axes_a[list(axes_windows).index(0)]
        out = _tensordot(a[(*batch, first)], windows[first], axes_a, axes_windows, outer="a")
        for chunk in rest:
            out += _tensordot(a[(*batch, chunk)], windows[chunk], axes_a, axes_windows, outer="a")
        return out
    lead = (slice(None),) * (a.ndim - len(axes_a))  # the result's axes before the batch
    part = _tensordot(a, windows[first], axes_a, axes_windows, outer="a")
    out = np.empty((*part.shape[: len(lead)], len(windows), *part.shape[len(lead) + 1 :]),
                   dtype=part.dtype)
    out[(*lead, first)] = part
    for chunk in rest:
        out[(*lead, chunk)] = _tensordot(a, windows[chunk], axes_a, axes_windows, outer="a")
    return out


def _col2im_tensordot(a, b, axes_a, axes_b, order, kernel, stride, dilation):
    """_col2im(np.tensordot(a, b, (axes_a, axes_b)).transpose(order), kernel, stride, dilation):
    a product's entries cols[..., p, q, i, j] added onto out[..., p*stride + i*dilation,
    q*stride + j*dilation].

    Banded route (when cheaper, and j and q come from different operands): the operand with j
    is multiplied by shift[j, q, w] = (w == q*stride + j*dilation) first, and the product with
    the other operand sums over q too, giving rows[..., p, i, w]: only the window rows are
    scattered (_row_col2im), kernel-width times fewer entries than the columns.
    """
    cols_labels = [*range(len(order) - 4), "p", "q", "i", "j"]
    free = iter(cols_labels[list(order).index(k)] for k in range(len(order)))
    labels_a = [f"s{axes_a.index(k)}" if k in axes_a else next(free) for k in range(a.ndim)]
    labels_b = [f"s{axes_b.index(k)}" if k in axes_b else next(free) for k in range(b.ndim)]
    summed = [f"s{k}" for k in range(len(axes_a))]
    sizes = dict(zip(labels_a, a.shape, strict=True))
    sizes.update(zip(labels_b, b.shape, strict=True))
    height, width = _col2im_extent((sizes["p"], sizes["q"]), kernel, stride, dilation)
    banded_a = "j" in labels_a  # the operand the band is made from
    if banded_a == ("q" in labels_a) or not _cheaper_banded_scatter(
        sizes, a.size, b.size, banded_a, summed, kernel, width
    ):
        product = _tensordot(a, b, axes_a, axes_b, outer="a")
        return _col2im(product.transpose(order), kernel, stride, dilation)
    (banded, banded_labels), (other, other_labels) = sorted(
        [(a, labels_a), (b, labels_b)], key=lambda operand: "j" not in operand[1]
    )
    columns = other.shape[other_labels.index("q")]
    shift = _shift(kernel[1], columns, width, stride, dilation, np.result_type(a, b))
    band, band_labels = _labelled_product(banded, banded_labels, shift, ["j", "q", "w"], ["j"])
    rows, labels = _labelled_product(other, other_labels, band, band_labels, [*summed, "q"])
    rows = rows.transpose([labels.index(label) for label in [*cols_labels[:-4], "p", "i", "w"]])
    return _row_col2im(rows, height, stride, dilation)


def _cheaper_banded_scatter(sizes, size_a, size_b, banded_a, summed, kernel, width):
    """Whether the banded route of _col2im_tensordot costs less than product plus col2im
    (sizes: each axis label's length; banded_a: the band is made from a, else from b)."""
    summed_size = math.prod(sizes[label] for label in summed)
    cols = size_a * size_b // max(summed_size, 1) ** 2
    banded, other = (size_a, size_b) if banded_a else (size_b, size_a)
    rows = cols // sizes["q"] // kernel[1] * width
    im2col = cols + cols * summed_size / _MACS_PER_ELEMENT
    band_size = banded // kernel[1] * sizes["q"] * width
    macs = banded * sizes["q"] * width + band_size * other // max(summed_size, 1) // sizes["q"]
    return rows + macs / _MACS_PER_ELEMENT < im2col
