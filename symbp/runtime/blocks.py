"""Sums into an existing array, computed a block of its rows at a time.

Contract: ``_add_blocks(out, term, *args, **keywords)`` is ``out += term(*args, **keywords)``,
to the bit, for a ``term`` that computes element by element (its value at an index reads its
array arguments at that index alone; they have ``out``'s shape). Only the size of the
temporaries differs.
"""


# About 64 KiB of float64 a block: a block's temporary stays in the cache and below glibc's
# mmap threshold (128 KiB), which a temporary as large as a weight crosses.
_BLOCK_SIZE = 8192


def _add_blocks(out, term, *args, **keywords):
    """out += term(*args, **keywords), a block of out's leading rows at a time.

    Adding a whole temporary to a gradient (weight decay's weight_decay*W, 1.6 MB for a
    784 x 256 weight) made a training step of symbp's mlp_weight_decay example 2.5x slower on
    a 2-core Linux machine: glibc hands a freed allocation over its mmap threshold back to the
    system, and the arrays allocated after it fault their pages in again. A block's temporary
    of at most _BLOCK_SIZE numbers (or one row) is reused from the heap.
    """
    if out.ndim == 0:
        out += term(*args, **keywords)
        return
    rows = max(1, _BLOCK_SIZE // max(1, out.size // max(1, len(out))))
    for start in range(0, len(out), rows):
        out[start : start + rows] += term(*(a[start : start + rows] for a in args), **keywords)
