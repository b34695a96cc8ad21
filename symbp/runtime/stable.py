"""Sigmoid and softplus in forms that neither overflow nor lose relative accuracy.

Contract: ``_sigmoid(u)`` is 1/(1 + e**-u) and ``_softplus(u)`` is log(1 + e**u), element-wise,
for any array-like u (float dtype kept, float64 for integers; u's shape), accurate to a few ulp
in both tails, with +-inf and nan giving the limits and nan.
"""

import numpy as np


def _exp_minus_abs(u):
    """e**-|u| (at most 1) for the array u, flattened, in u's float dtype (float64 for ints)."""
    dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.float64
    e = np.abs(u.reshape(-1)).astype(dtype, copy=False)
    np.negative(e, out=e)
    return np.exp(e, out=e)


def _sigmoid(u):
    """1/(1 + e**-u) element-wise: 1/(1 + e) for u >= 0 and e/(1 + e) below, with e = e**-|u|
    (at most 1: nothing overflows, and both tails keep their relative accuracy).

    Its exponential is a SIMD loop in NumPy; exp(-logaddexp(0, -u)), the one-line form,
    took 2-3x as long (symbp's docs/speed.md). The numerator is max(e, u >= 0), exactly 1 or
    e as 0 <= e <= 1 (nan stays nan): np.where's data-dependent selection took 3-4x as long
    in float32 at an LSTM gate's (64, 256).
    """
    u = np.asarray(u)
    e = _exp_minus_abs(u)
    s = np.maximum(e, u.reshape(-1) >= 0)
    e += 1
    return np.divide(s, e, out=s).reshape(u.shape)


def _softplus(u):
    """log(1 + e**u) element-wise: max(u, 0) + log1p(e**-|u|) (nothing overflows, and the
    relative accuracy holds for u far below 0, where the value is e**u).

    np.logaddexp(0, u), the one-line form, took 2.5x (float64) and 10x (float32) as long
    (symbp's docs/speed.md).
    """
    u = np.asarray(u)
    e = _exp_minus_abs(u)
    np.log1p(e, out=e)
    return np.add(np.maximum(u.reshape(-1), 0), e, out=e).reshape(u.shape)
