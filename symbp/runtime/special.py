"""erf and erfc, which NumPy lacks, as whole-array passes over Chebyshev fits.

Contract: ``_erf(a)`` and ``_erfc(a)`` are erf and erfc element-wise, within 2 and 5 ulp of
math.erf and math.erfc in float64 (computed in float64; float32 in, float32 out; float64 for
integers; a's shape). The fits' coefficients are module-level tables, refitted and checked by
symbp's tests/test_helpers.py. float32's erf, math.erf rounded to float32, needs no pieces: a
table of erf's Taylor coefficients, evaluated in float64, then rounded (half the time).
"""

import math

import numpy as np

# Chebyshev fits of erf and erfc to double precision (mpmath.chebyfit at 50 digits, rounded
# to doubles; symbp's tests/test_helpers.py refits them and checks _erf and _erfc against
# math.erf and math.erfc), as polynomials in u (coefficients from the highest power down),
# u running over [-1, 1] as v runs over [lo, hi]: u = (2*v - lo - hi)/(hi - lo).
# erf(x)/x for |x| < 1, in v = x**2 over [0, 1]:
_ERF_NEAR_0 = (
    -3.80659122412214e-13, 9.21125018742823e-12, -2.035231956483527e-10, 4.115751500265885e-09,
    -7.51156925108609e-08, 1.2233827638093572e-06, -1.75371694412802e-05, 0.00021751715603563488,
    -0.0022854855611440855, 0.019852496688984218, -0.1405360890227171, 0.9654687386698673,
)
# e**(x**2)*erfc(x) (erfcx) in v = x over each (lo, hi):
_ERFCX_PIECES = (
    (0.5, 1.0, (
        2.581271691748106e-12, -3.010096125292678e-11, 3.3061733705972456e-10,
        -3.579272112111564e-09, 3.719543629447327e-08, -3.693567406943463e-07,
        3.4885738807897664e-06, -3.1149669808397036e-05, 0.0002609005567498488,
        -0.0020286884686890566, 0.014434883221956088, -0.09199317291394817, 0.5069376502931449,
    )),
    (1.0, 2.0, (
        2.0206514750441873e-13, -1.512018061489917e-12, 1.0201594788774491e-11,
        -7.257032617086992e-11, 5.04654734183512e-10, -3.405938587821499e-09,
        2.2328417586062252e-08, -1.4191186135917107e-07, 8.72304473829848e-07,
        -5.171328672722121e-06, 2.947085745299996e-05, -0.0001608111733699307,
        0.0008360838095667121, -0.004116363162445659, 0.01903775996386935, -0.08181145886628002,
        0.3215854164543175,
    )),
    (2.0, 4.0, (
        1.6482525468969957e-12, -8.134236373235494e-12, 3.1724792006762475e-11,
        -1.5077563830210874e-10, 7.20516363335066e-10, -3.316229237177357e-09,
        1.4977253627698686e-08, -6.64646639786765e-08, 2.8926684651166363e-07,
        -1.2333685934914701e-06, 5.146436522511331e-06, -2.0989464259545496e-05,
        8.355413963369297e-05, -0.00032412554452200884, 0.0012230390523765237,
        -0.004479431018371144, 0.01588437115987134, -0.05437226000717289, 0.17900115118138996,
    )),
    (4.0, 6.0, (
        3.119800563482243e-12, -1.9373905066881707e-11, 1.0730827031906663e-10,
        -6.502150536423046e-10, 3.911576045501576e-09, -2.3149602195480604e-08,
        1.35293513834834e-07, -7.806310798953313e-07, 4.444334378504417e-06,
        -2.4953883753362215e-05, 0.00013810242089763806, -0.0007528968134103096,
        0.0040406889089371475, -0.021332789764826766, 0.11070463773306863,
    )),
)
# x*e**(x**2)*erfc(x) for x in [6, 27.3], in v = 1/x**2 (erfc is below the least double
# beyond 27.3):
_ERFCX_TAIL_RANGE = (1 / 27.3**2, 1 / 36)
_ERFCX_TAIL = (
    1.4060453184900692e-14, -1.4261130051371604e-13, 1.5453182634050421e-12,
    -1.9132885748552595e-11, 2.674535054514887e-10, -4.318911447450026e-09, 8.32775943052809e-08,
    -2.0153788978923837e-06, 6.659910660757375e-05, -0.0035741965837192517, 0.5601689404508194,
)


def _erf_taylor_table(step, top, order):
    """Row k, column j: erf's k-th Taylor coefficient erf^(k)(x0)/k! at x0 = j/step, for
    x0 from 0 to top: erf(x0), then 2/sqrt(pi)*(-1)**(k-1)*H_(k-1)(x0)*e**(-x0**2)/k!, with the
    Hermite polynomials H_0 = 1, H_1 = 2x, H_(k+1) = 2x*H_k - 2k*H_(k-1)."""
    x = np.arange(top * step + 1) / step
    table = np.empty((order + 1, x.size))
    table[0] = [math.erf(v) for v in x]
    gauss = 2 / math.sqrt(math.pi) * np.exp(-x * x)
    before, hermite = np.zeros_like(x), np.ones_like(x)
    for k in range(1, order + 1):
        table[k] = (-1) ** (k - 1) * hermite * gauss / math.factorial(k)
        before, hermite = hermite, 2 * x * hermite - 2 * (k - 1) * before
    return table


# float32's erf for |x| <= 4 (beyond, erf rounds to +-1 in float32: erfc(4) < 2**-25): the
# Taylor polynomial of degree 4 about the nearest x0 = j/512, |x - x0| <= 1/1024, whose
# remainder is below 13.5*(1/1024)**5/5! = 1e-16 (|erf^(5)| <= 2/sqrt(pi)*12).
_ERF32_STEP = 512
_ERF32_TAYLOR = _erf_taylor_table(_ERF32_STEP, 4, 4)


def _erf(a):
    """erf element-wise, in whole-array passes (NumPy has none): x*P(x**2) for |x| < 1,
    1 - erfc(|x|) with the sign of x up to 6, and +-1 beyond (erfc(6) is below half an ulp of 1).
    Within 2 ulp of math.erf in float64; float32 in, float32 out: math.erf rounded to float32,
    from erf's Taylor table (_erf32_of).
    """
    x = np.asarray(a)
    if x.dtype != np.float32:
        return _in_blocks(_erf_of, a)
    out = np.empty(x.shape, np.float32)
    flat, v = out.reshape(-1), x.ravel()
    for start in range(0, v.size, _ERF_BLOCK):
        flat[start : start + _ERF_BLOCK] = _erf32_of(v[start : start + _ERF_BLOCK])
    return out


def _erf32_of(v):
    """erf of a 1-D float32 array, in float64 before the caller rounds it: the Taylor
    polynomial about the nearest table point x0 = j/_ERF32_STEP to |x| (clipped to 4), by
    Horner in d = |x| - x0 (exact in float32), with the sign of x; nan for nan."""
    size = np.minimum(np.abs(v), np.float32(4))
    nearest = np.rint(size * np.float32(_ERF32_STEP))
    with np.errstate(invalid="ignore"):  # nan's row: any (its value stays nan)
        row = nearest.astype(np.intp)
    d = (size - nearest * np.float32(1 / _ERF32_STEP)).astype(np.float64)
    out = _ERF32_TAYLOR[-1].take(row, mode="clip")
    for coefficients in _ERF32_TAYLOR[-2::-1]:
        out *= d
        out += coefficients.take(row, mode="clip")
    return np.copysign(out, v, out=out)


def _erf_of(v):
    """_erf's work on a 1-D float64 array."""
    out = np.sign(v)  # +-1 beyond 6 (and for +-inf), nan for nan; the rest is overwritten
    size = np.abs(v)
    near = np.flatnonzero(size < 1)
    out[near] = v[near] * _polynomial(_ERF_NEAR_0, 2 * v[near] ** 2 - 1)
    middle = np.flatnonzero((size >= 1) & (size < 6))
    out[middle] = np.copysign(1 - _erfc_from(size[middle]), v[middle])
    return out


def _erfc(a):
    """erfc element-wise, in whole-array passes (NumPy has none): 1 - erf(x) for -1 < x < 1/2
    (where erfc(x) > 1/2), erfc from its fits for x >= 1/2 and 2 - erfc(-x) for x <= -1.
    Within 5 ulp of math.erfc in float64; float32 in, float32 out (computed in float64).
    """
    return _in_blocks(_erfc_of, a)


def _erfc_of(v):
    """_erfc's work on a 1-D float64 array."""
    out = 1 - np.sign(v)  # 0 and 2 beyond the fits (and for +-inf), nan for nan
    near = np.flatnonzero((v > -1) & (v < 0.5))
    out[near] = 1 - v[near] * _polynomial(_ERF_NEAR_0, 2 * v[near] ** 2 - 1)
    right = np.flatnonzero(v >= 0.5)
    out[right] = _erfc_from(v[right])
    left = np.flatnonzero(v <= -1)
    out[left] = 2 - _erfc_from(-v[left])
    return out


# _erf and _erfc work on blocks of this many numbers, whose temporaries stay in the cache: on
# a (256, 1024) array, 0.6x the time of one pass over it all (symbp's docs/speed.md).
_ERF_BLOCK = 1 << 16


def _in_blocks(work, a):
    """work(block) for blocks of _ERF_BLOCK numbers of a, computed in float64; the result has
    a's shape and float dtype (float64 for integers)."""
    x = np.asarray(a)
    v = x.astype(np.float64).ravel()
    for start in range(0, v.size, _ERF_BLOCK):
        block = v[start : start + _ERF_BLOCK]
        block[...] = work(block)
    return v.reshape(x.shape).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)


def _erfc_from(v):
    """erfc(v) for a 1-D float64 array of v >= 1/2: e**(-v**2) times erfcx's fit on v's piece,
    0 from 27.3 on (and for inf)."""
    out = np.zeros_like(v)
    for lo, hi, coefficients in _ERFCX_PIECES:
        part = np.flatnonzero((v >= lo) & (v < hi))
        w = v[part]
        out[part] = _exp_minus_square(w) * _polynomial(coefficients, (2 * w - lo - hi) / (hi - lo))
    lo, hi = _ERFCX_TAIL_RANGE
    part = np.flatnonzero((v >= 6) & (v < 27.3))
    w = v[part]
    t = 1 / w**2
    out[part] = _exp_minus_square(w) * _polynomial(_ERFCX_TAIL, (2 * t - lo - hi) / (hi - lo)) / w
    return out


def _exp_minus_square(v):
    """e**(-v**2) for a float64 array, to full precision for |v| up to 27: v**2 taken as
    h**2 + (v - h)*(v + h), with h = v cut to 26 significant bits (h**2 is exact)."""
    h = (v.view(np.int64) & ~np.int64((1 << 27) - 1)).view(np.float64)
    return np.exp(-h * h) * np.exp((h - v) * (v + h))


def _polynomial(coefficients, u):
    """The polynomial with these coefficients (the highest power first) at u, by Horner."""
    first, *rest = coefficients
    out = np.full_like(u, first)
    for c in rest:
        out *= u
        out += c
    return out
