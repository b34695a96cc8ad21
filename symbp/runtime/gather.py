"""Rows added back at their ids: the adjoint of reading a table's rows at integer ids.

Contract: ``_scatter_rows(rows, ids, count)`` is the (count, width) array of rows' dtype whose
row v is the sum of the rows of ``rows`` (its axes but the last taken as one, ``width`` its last
axis' length) whose id (the same place in ``ids``) is v; ids are integers in [0, count). Each
row's sum adds its terms in the order they come (deterministic, the same bits every call).
"""

import numpy as np


def _scatter_rows(rows, ids, count):
    """Each id's rows summed into its row of a zero (count, width) array, whole-array: the ids
    sorted (stably), an id met once gets its row copied, an id met several times the sum of
    its run of rows (np.add.reduceat over those runs alone, which is slow on runs of one)."""
    ids = ids.reshape(-1)
    rows = rows.reshape(len(ids), rows.shape[-1])
    out = np.zeros((count, rows.shape[1]), dtype=rows.dtype)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))[: len(ids)]
    lengths = np.diff(np.append(starts, len(ids)))
    once = lengths == 1
    out[ordered[starts[once]]] = rows[order[starts[once]]]
    if not once.all():
        several = ~once
        runs = order[np.repeat(several, lengths)]  # the rows of the ids met several times
        firsts = np.concatenate(([0], np.cumsum(lengths[several])[:-1]))
        out[ordered[starts[several]]] = np.add.reduceat(rows[runs], firsts, axis=0)
    return out
