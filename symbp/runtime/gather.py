"""Rows added back at their ids: the adjoint of reading a table's rows at integer ids.

Contract: ``_scatter_rows(rows, ids, count)`` is the (count, width) array of rows' dtype whose
row v is the sum of the rows of ``rows`` (its axes but the last taken as one, ``width`` its last
axis' length) whose id (the same place in ``ids``) is v; ids are integers in [0, count). Each
row's sum adds its terms in the order they come (deterministic, the same bits every call).
"""

import numpy as np


def _scatter_rows(rows, ids, count):
    """Each id's rows summed into its row of a zero (count, width) array: a stable sort of
    the ids, then np.add.reduceat over each run of equal ids (whole-array, no loop)."""
    ids = ids.reshape(-1)
    rows = rows.reshape(len(ids), rows.shape[-1])
    out = np.zeros((count, rows.shape[1]), dtype=rows.dtype)
    if len(ids) == 0:
        return out
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    out[ordered[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out
