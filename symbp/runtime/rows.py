"""Passes that broadcast a vector along the rows of a 2-D array, at full speed.

Contract: ``_row_vector(v)`` has ``v``'s values (``v`` itself or a copy in another allocation);
``_along_rows(ufunc, a, b, out)`` is ``ufunc(a, b, out=out)`` to the bit, computed over long rows
where that is faster. Both only place the same numbers in memory that NumPy reads faster.
"""

import numpy as np


def _row_vector(v):
    """v, or a copy of it, placed where a pass broadcasting it along the rows of a big array
    reads it at full speed.

    A vector freshly allocated with a size in bytes that is a multiple of 4 KiB (1024 float32
    or 512 float64 numbers) made such passes (dx *= gamma*invstd) run 5-12x slower on an AMD
    EPYC machine (symbp's docs/speed.md); in an allocation 16 bytes longer they do not. The
    copy takes a few microseconds; the values are v's.
    """
    if v.nbytes % 4096:
        return v
    out = np.empty(v.size + max(1, 16 // v.itemsize), dtype=v.dtype)[: v.size]
    out[...] = v
    return out


# Below this many numbers in the 2-D array the plain ufunc call is used: the helper's own
# work (about 4 us) made passes over 64K numbers no faster (docs/speed.md).
_ALONG_ROWS_MIN = 1 << 17


def _along_rows(ufunc, a, b, out=None):
    """ufunc(a, b, out=out), one of a and b a 2-D array and the other a vector as long as its
    rows (broadcast along them), with the array's rows taken t at a time as one long row.

    NumPy runs such a pass a row at a time, and rows shorter than its ufunc buffer
    (np.getbufsize(), 8192 numbers) go through that buffer: multiplying a (4096, 256) float64
    array by a vector took 355 us so, and 231 us on rows of 8192 numbers against the vector
    repeated (symbp's docs/speed.md). Here t rows of the array are read as one row of a
    reshaped view, against the vector repeated t times; the rows left over go the plain way.
    Every number is ufunc(a, b)'s, exactly.
    """
    big, vector = (a, b) if np.ndim(a) == 2 else (b, a)
    if np.ndim(big) != 2 or np.shape(vector) != big.shape[1:]:
        return ufunc(a, b, out=out)
    rows, width = big.shape
    t = min(rows, -(-np.getbufsize() // max(width, 1)))
    # The vectors in allocations that are not a multiple of 4 KiB (see _row_vector).
    if (
        t < 2
        or big.size < _ALONG_ROWS_MIN
        or not big.flags.c_contiguous
        or not (out is None or out.flags.c_contiguous)
    ):
        placed = _row_vector(vector)
        a, b = (big, placed) if big is a else (placed, big)
        return ufunc(a, b, out=out)
    if out is None:
        out = np.empty(big.shape, dtype=np.result_type(a, b))
    whole = rows - rows % t
    repeated = np.empty(t * width + max(1, 16 // vector.itemsize), vector.dtype)[: t * width]
    repeated.reshape(t, width)[...] = vector
    vector = repeated[:width]
    long_rows = big[:whole].reshape(-1, t * width)
    first, second = (long_rows, repeated) if big is a else (repeated, long_rows)
    ufunc(first, second, out=out[:whole].reshape(-1, t * width))
    if whole < rows:
        first, second = (big[whole:], vector) if big is a else (vector, big[whole:])
        ufunc(first, second, out=out[whole:])
    return out
