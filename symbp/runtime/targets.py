"""Class labels as the rows a loss compares the network's output with.

Contract: ``_one_hot(y, out)`` is the (len(y), out.shape[1]) array of out's dtype whose row n is
1 in column y[n] and 0 elsewhere; y holds integer class labels in [0, out.shape[1]).
"""

import numpy as np


def _one_hot(y, out):
    """Row n of the identity of out's width, for each label y[n]: the one-hot targets."""
    return np.eye(out.shape[1], dtype=out.dtype)[y]
