"""The NumPy printer, at two levels: the exact code it prints for small whole-array expressions
(the nodes of :mod:`symbp.derivation.arrays` and the sympy functions the engine produces), and the
numbers that code computes, compared with NumPy written independently here.

Also the known ways a sympy-to-NumPy printer goes silently wrong: the imaginary unit or an
identity matrix printed as ``I``/``1j`` (sympy #17006), a scalar multiple printed as a matrix
product (``(2).dot(A)``, sympy #15827), and irrational constants that turn float32 into float64.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sympy as sp

from symbp.derivation.arrays import (
    Dot,
    Einsum,
    Lowering,
    MaxOver,
    NewAxis,
    Permute,
    Sigmoid,
    Softplus,
    Step,
    SumOver,
    TensorDot,
)
from symbp.emit.numpy_printer import SymbpNumPyPrinter, numpy_code
from symbp.errors import DerivationError
from symbp.runtime.rows import _along_rows
from symbp.runtime.special import _erf, _erfc
from symbp.runtime.stable import _sigmoid, _softplus

A, B, C = (sp.Symbol(name, real=True) for name in "ABC")
u, v = sp.Symbol("u", real=True), sp.Symbol("v", real=True)
N = sp.Symbol("N", integer=True, positive=True)


#: The runtime helpers (symbp/runtime/) that printed code may call.
RUNTIME = {"_along_rows": _along_rows, "_sigmoid": _sigmoid, "_softplus": _softplus,
           "_erf": _erf, "_erfc": _erfc}


def run(code: str, **arrays) -> np.ndarray:
    """Evaluate printed code with ``np``, the given arrays and, where the code calls them, the
    runtime's helpers in scope (no other names)."""
    scope = {"np": np, **{name: f for name, f in RUNTIME.items() if f"{name}(" in code}}
    return eval(code, scope, arrays)  # noqa: S307


def rng_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "A": rng.standard_normal((3, 4)),
        "B": rng.standard_normal((4, 5)),
        "C": rng.standard_normal((3, 4)),
        "u": rng.standard_normal((3, 4)) * 3,
        "v": rng.standard_normal((3, 4)),
        "a": rng.standard_normal(4),
        "N": 3,
    }


# --------------------------------------------------------------------------- exact strings

# (expression, exact code, the same computation written in NumPy here)
CASES = [
    (Dot(A, B), "A @ B", lambda d: np.matmul(d["A"], d["B"])),
    (Dot(Permute(A), C), "A.T @ C", lambda d: d["A"].T @ d["C"]),
    # the product negated, not its first operand (a pass over a big array before the product)
    (-Dot(A, B), "-(A @ B)", lambda d: -np.matmul(d["A"], d["B"])),
    (Dot(A, Permute(C)), "A @ C.T", lambda d: d["A"] @ d["C"].T),
    (Permute(A + C), "(A + C).T", lambda d: np.transpose(d["A"] + d["C"])),
    (SumOver(A, sp.Tuple(0)), "A.sum(axis=0)", lambda d: np.sum(d["A"], axis=0)),
    (SumOver(A * C, sp.Tuple(0)), "(A*C).sum(axis=0)",
     lambda d: np.einsum("ij,ij->j", d["A"], d["C"])),
    (SumOver(A, sp.Tuple(0, 1)), "A.sum(axis=(0, 1))", lambda d: np.sum(d["A"])),
    # an element-wise product summed: einsum's own loop (its optimized path was 10x slower on
    # batch norm's channel sums); a real contraction: optimize=True, BLAS through tensordot
    (Einsum(sp.Symbol("ij,ij->j"), A, C), 'np.einsum("ij,ij->j", A, C)',
     lambda d: (d["A"] * d["C"]).sum(axis=0)),
    (Einsum(sp.Symbol("ij,jk->ik"), A, B), 'np.einsum("ij,jk->ik", A, B, optimize=True)',
     lambda d: d["A"] @ d["B"]),
    (MaxOver(u, sp.Tuple(1)), "u.max(axis=1)", lambda d: np.amax(d["u"], axis=1)),
    (NewAxis(SumOver(A, sp.Tuple(1)), sp.Tuple(1)), "(A.sum(axis=1))[:, None]",
     lambda d: np.sum(d["A"], axis=1, keepdims=True)),
    (A - NewAxis(MaxOver(A, sp.Tuple(1)), sp.Tuple(1)), "A - (A.max(axis=1))[:, None]",
     lambda d: d["A"] - np.amax(d["A"], axis=1, keepdims=True)),
    (Sigmoid(u), "_sigmoid(u)", lambda d: 1 / (1 + np.exp(-d["u"]))),
    (Sigmoid(-u), "_sigmoid(-u)", lambda d: 1 / (1 + np.exp(d["u"]))),
    (Sigmoid(u - v), "_sigmoid(u - v)",
     lambda d: 1 / (1 + np.exp(d["v"] - d["u"]))),
    (Softplus(u), "_softplus(u)", lambda d: np.log1p(np.exp(d["u"]))),
    (Softplus(-2 * u), "_softplus(-2*u)", lambda d: np.log1p(np.exp(-2 * d["u"]))),
    (Step(u), "np.heaviside(u, 0)", lambda d: np.heaviside(d["u"], 0.0)),
    (v * Step(u), "v*(u > 0)", lambda d: d["v"] * np.heaviside(d["u"], 0.0)),
    # booleans add as "or" and refuse unary minus: outside a product with an array, heaviside
    (Step(u) + Step(u - v), "np.heaviside(u, 0) + np.heaviside(u - v, 0)",
     lambda d: (d["u"] > 0) * 1.0 + (d["u"] > d["v"]) * 1.0),
    (-Step(u), "-np.heaviside(u, 0)", lambda d: np.where(d["u"] > 0, -1.0, 0.0)),
    (v * (Step(u) + Step(-u)), "v*(np.heaviside(-u, 0) + np.heaviside(u, 0))",
     lambda d: d["v"] * (d["u"] != 0)),
    (sp.Piecewise((u, u > 0), (u / 10, True)), "np.where(u > 0, u, (1/10)*u)",
     lambda d: np.array([[x if x > 0 else x / 10 for x in row] for row in d["u"]])),
    (sp.Piecewise((u, u > 1), (v, u < -1), (0, True)), "np.where(u > 1, u, np.where(u < -1, v, 0))",
     lambda d: np.select([d["u"] > 1, d["u"] < -1], [d["u"], d["v"]], 0.0)),
    (sp.Max(0, u), "np.maximum(u, 0)", lambda d: np.clip(d["u"], 0, None)),
    (sp.Min(u, 1), "np.minimum(u, 1)", lambda d: np.clip(d["u"], None, 1)),
    (sp.Max(u, v), "np.maximum(u, v)", lambda d: np.where(d["u"] > d["v"], d["u"], d["v"])),
    (sp.Max(u, 1, -u), "np.maximum(u, np.maximum(-u, 1))",
     lambda d: np.max([d["u"], -d["u"], np.ones_like(d["u"])], axis=0)),
    (sp.Min(u, v, 0), "np.minimum(u, np.minimum(v, 0))",
     lambda d: np.min([d["u"], d["v"], np.zeros_like(d["u"])], axis=0)),
    (sp.sin(2) * u, "0.9092974268256817*u", lambda d: math.sin(2) * d["u"]),
    (2 * A, "2*A", lambda d: d["A"] + d["A"]),
    (A * C, "A*C", lambda d: np.multiply(d["A"], d["C"])),
    (A / 3, "(1/3)*A", lambda d: d["A"] / 3),
    (1 / sp.sqrt(u**2 + 1), "1/np.sqrt(u**2 + 1)", lambda d: (d["u"] ** 2 + 1) ** -0.5),
    (1 / (u**2 + 1), "1/(u**2 + 1)", lambda d: np.reciprocal(d["u"] ** 2 + 1)),
    (sp.tanh(u) * sp.exp(-u), "np.exp(-u)*np.tanh(u)", lambda d: np.tanh(d["u"]) / np.exp(d["u"])),
    (N * A / (N - 1), "A*N/(N - 1)", lambda d: d["A"] * 3 / 2),
    # a size is a Python int: its square root a Python float, which keeps float32 arrays float32
    (A / sp.sqrt(N), "A/N**0.5", lambda d: d["A"] / math.sqrt(3)),
    (sp.sqrt(N) * A, "A*N**0.5", lambda d: math.sqrt(3) * d["A"]),
    (sp.Abs(u), "abs(u)", lambda d: np.abs(d["u"])),
]


# Exact strings: the printer's spelling is the feature here (readable whole-array NumPy, sums
# spelled as sums, issue 23 item 6); the companion tests run each printed line against its
# reference, so a change of spelling only touches these tables.
@pytest.mark.parametrize(("expr", "code", "reference"), CASES, ids=[c[1] for c in CASES])
def test_exact_code(expr, code, reference):
    assert numpy_code(expr) == code


@pytest.mark.parametrize(("expr", "code", "reference"), CASES, ids=[c[1] for c in CASES])
def test_printed_code_computes_the_reference(expr, code, reference):
    arrays = rng_arrays()
    result = run(SymbpNumPyPrinter().doprint(expr), **arrays)
    np.testing.assert_allclose(result, reference(arrays), rtol=1e-14, atol=1e-14)


def test_the_square_root_of_a_size_keeps_float32():
    A32 = np.ones((2, 2), np.float32)
    assert run(numpy_code(A / sp.sqrt(N)), A=A32, N=4).dtype == np.float32


def test_permute_with_an_axis_order():
    expr = Permute(A, sp.Tuple(1, 0, 2))
    assert SymbpNumPyPrinter().doprint(expr) == "np.transpose(A, (1, 0, 2))"
    array = np.arange(24.0).reshape(2, 3, 4)
    assert np.array_equal(run("np.transpose(A, (1, 0, 2))", A=array), np.einsum("ijk->jik", array))


def test_newaxis_at_several_positions():
    expr = NewAxis(A + C, sp.Tuple(0, 2))
    assert SymbpNumPyPrinter().doprint(expr) == "(A + C)[None, :, None]"
    a, c = np.arange(3.0), np.ones(3)
    assert run("(A + C)[None, :, None]", A=a, C=c).shape == (1, 3, 1)


def test_step_is_zero_at_the_kink_and_keeps_float32():
    value = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    upstream = np.full(3, 3.0, dtype=np.float32)
    result = run(SymbpNumPyPrinter().doprint(v * Step(u)), u=value, v=upstream)
    assert result.dtype == np.float32
    assert result.tolist() == [0.0, 0.0, 3.0]


@pytest.mark.parametrize("expr", [2 * Step(u) + Step(u - 1), -Step(u), Step(u) * Step(u - 1)])
def test_steps_outside_a_product_with_an_array_are_numbers_in_the_input_dtype(expr):
    """(u > 0) + (u > 1) would be a boolean "or", 2*(u > 0) an int64 array."""
    value = np.array([-1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    result = run(SymbpNumPyPrinter().doprint(expr), u=value)
    assert result.dtype == np.float32
    expected = [float(expr.subs(u, x).replace(Step, lambda w: sp.Heaviside(w, 0))) for x in value]
    assert result.tolist() == expected


def test_piecewise_takes_the_later_branch_at_the_boundary():
    code = SymbpNumPyPrinter().doprint(sp.Piecewise((u, u > 0), (u / 4 - 1, True)))
    assert run(code, u=np.array([0.0]))[0] == -1.0


def test_piecewise_without_a_default_branch_is_refused():
    with pytest.raises(ValueError, match="final True branch"):
        SymbpNumPyPrinter().doprint(sp.Piecewise((u, u > 0), (v, u < 0)))


@pytest.mark.parametrize(("expr", "code"), [
    (2 * (sp.exp(u) - 1), "2*np.expm1(u)"),
    (sp.exp(u) + v - 1, "v + np.expm1(u)"),
    (sp.log(1 + u**2), "np.log1p(u**2)"),
    (sp.exp(u) - 2, "np.exp(u) - 2"),  # not c*exp(u) - c: left alone
    (sp.Rational(1, 2) * sp.exp(-u) - sp.Rational(1, 2), "(1/2)*np.expm1(-u)"),
    (sp.log(u), "np.log(u)"),
])
def test_exp_minus_one_and_log_one_plus_print_as_expm1_and_log1p(expr, code):
    assert numpy_code(expr) == code


def test_expm1_keeps_the_digits_of_small_arguments():
    """ELU's alpha*(exp(x) - 1) just below 0: the printed code gives x to the last digit,
    where exp(x) - 1 keeps about half of them (an independent value: the Taylor series)."""
    x = np.array([-1e-10, -3e-9, -1e-12])
    got = run(numpy_code(sp.exp(u) - 1), u=x)
    taylor = x + x**2 / 2 + x**3 / 6
    assert np.allclose(got, taylor, rtol=1e-15, atol=0)
    assert not np.allclose(np.exp(x) - 1, taylor, rtol=1e-9, atol=0)


def test_erf_goes_through_the_helper_and_is_recorded():
    printer = SymbpNumPyPrinter()
    assert printer.doprint(sp.erf(u) + sp.erfc(v)) in ("_erf(u) + _erfc(v)", "_erfc(v) + _erf(u)")
    assert printer.helpers_used == {"_erf", "_erfc"}  # what they call is the registry's to find


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stable_forms_do_not_overflow_at_magnitude_1000(dtype):
    value = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0], dtype=dtype)
    sigmoid = numpy_code(Sigmoid(u))
    softplus = numpy_code(Softplus(u))
    # Underflow (exp(-1000) -> 0) is the correctly rounded result; anything else raises.
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        s, p = run(sigmoid, u=value), run(softplus, u=value)
    assert s.dtype == p.dtype == dtype
    expected_s = [0.0, 1 / (1 + math.exp(30)), 0.5, 1 / (1 + math.exp(-30)), 1.0]
    expected_p = [0.0, math.log1p(math.exp(-30)), math.log(2), 30 + math.log1p(math.exp(-30)), 1000]
    rtol = 1e-6 if dtype == np.float32 else 4e-15
    np.testing.assert_allclose(s, expected_s, rtol=rtol, atol=0)
    np.testing.assert_allclose(p, expected_p, rtol=rtol, atol=0)


def test_log_sum_exp_is_lowered_with_a_max_shift():
    n, c = sp.Symbol("n", integer=True), sp.Symbol("c", integer=True)
    z = sp.IndexedBase("z", real=True)
    C_ = sp.Symbol("C", integer=True, positive=True)
    lse = sp.log(sp.Sum(sp.exp(z[n, c]), (c, 0, C_ - 1)))
    code = numpy_code(Lowering({"z"}).lower(lse, (n,)))
    assert code == "np.log((np.exp(z - (z.max(axis=1))[:, None])).sum(axis=1)) + z.max(axis=1)"
    logits = np.array([[1000.0, -1000.0, 0.0], [3.0, 2.0, 1.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        result = run(code, z=logits)
    expected = [1000.0, 3 + math.log(1 + math.exp(-1) + math.exp(-2))]
    np.testing.assert_allclose(result, expected, rtol=1e-15)


# --------------------------------------------------------------------------- from index form


def _lowered(expr, axes, names):
    return numpy_code(Lowering(set(names)).lower(expr, axes))


def test_lowering_contractions_print_as_matmul():
    n, i, j, k = (sp.Symbol(s, integer=True) for s in "nijk")
    F = sp.Symbol("F", integer=True, positive=True)
    x, W, dz = (sp.IndexedBase(s, real=True) for s in ("x", "W", "dz"))
    forward = sp.Sum(x[n, k] * W[k, j], (k, 0, F - 1))
    input_grad = sp.Sum(dz[n, k] * W[i, k], (k, 0, F - 1))
    weight_grad = sp.Sum(dz[k, j] * x[k, i], (k, 0, F - 1))
    assert _lowered(forward, (n, j), {"x", "W"}) == "x @ W"
    assert _lowered(input_grad, (n, i), {"dz", "W"}) == "dz @ W.T"
    assert _lowered(weight_grad, (i, j), {"dz", "x"}) == "x.T @ dz"
    rng = np.random.default_rng(1)
    xs, Ws = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    dzs = rng.standard_normal((5, 4))
    np.testing.assert_allclose(run("x @ W", x=xs, W=Ws), np.einsum("nk,kj->nj", xs, Ws))
    np.testing.assert_allclose(run("dz @ W.T", dz=dzs, W=Ws), np.einsum("nk,ik->ni", dzs, Ws))
    np.testing.assert_allclose(run("x.T @ dz", dz=dzs, x=xs), np.einsum("kj,ki->ij", dzs, xs))


def test_lowering_sum_of_three_factors_as_a_matrix_vector_product():
    # layer norm's sum_k dy[n, k] gamma[k] xhat[n, k]: one GEMV of the two arrays' product
    # (no array of the three factors' product), the same numbers to rounding
    n, k = sp.Symbol("n", integer=True), sp.Symbol("k", integer=True)
    dy, xhat, g = (sp.IndexedBase(s, real=True) for s in ("dy", "xhat", "gamma"))
    total = sp.Sum(dy[n, k] * g[k] * xhat[n, k], (k, 0, N - 1))
    code = _lowered(total, (n,), {"dy", "xhat", "gamma"})
    assert code == "(dy*xhat) @ gamma"
    rng = np.random.default_rng(3)
    arrays = {"dy": rng.standard_normal((5, 4)), "xhat": rng.standard_normal((5, 4)),
              "gamma": rng.standard_normal(4)}
    np.testing.assert_allclose(
        run(code, **arrays), np.einsum("nk,k,nk->n", arrays["dy"], arrays["gamma"],
                                       arrays["xhat"]), rtol=1e-14)


def test_lowering_batch_sums_and_broadcasts():
    n, j, m = (sp.Symbol(s, integer=True) for s in "njm")
    dy, xhat, g = (sp.IndexedBase(s, real=True) for s in ("dy", "xhat", "gamma"))
    dgamma = sp.Sum(dy[m, j] * xhat[m, j], (m, 0, N - 1))
    assert _lowered(dgamma, (j,), {"dy", "xhat"}) == "(dy*xhat).sum(axis=0)"
    scaled = g[j] * dy[n, j] / N
    assert _lowered(scaled, (n, j), {"dy", "gamma"}) == "dy*gamma/N"
    rowwise = dy[n, j] * xhat[n, m]  # an outer product per row would need a 3-D array
    with pytest.raises(DerivationError):
        Lowering({"dy", "xhat"}).lower(rowwise, (n, j))


# --------------------------------------------------------------------------- sympy pitfalls


def test_a_scalar_multiple_is_elementwise_not_a_matrix_product():
    """sympy #15827: ``2*A`` once printed as ``(2).dot(A)``; ``A*C`` must never become ``@``."""
    square = np.array([[1.0, 2.0], [3.0, 4.0]])
    other = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert numpy_code(2 * A) == "2*A"
    assert np.array_equal(run(numpy_code(2 * A), A=square), [[2.0, 4.0], [6.0, 8.0]])
    assert np.array_equal(run(numpy_code(A * C), A=square, C=other), [[0.0, 2.0], [3.0, 0.0]])
    assert np.array_equal(run(numpy_code(Dot(A, C)), A=square, C=other), [[2.0, 1.0], [4.0, 3.0]])
    assert ".dot(" not in numpy_code(3 * Dot(A, C) + 2 * A)


def test_the_imaginary_unit_never_reaches_numpy():
    """sympy #17006: an identity printed as ``I`` is 1j in Python. The lowering refuses complex
    values (and leftover Kronecker deltas, the index form of an identity) with a named error."""
    n = sp.Symbol("n", integer=True)
    x = sp.IndexedBase("x", real=True)
    with pytest.raises(DerivationError):
        Lowering({"x"}).lower(sp.I * x[n], (n,))
    with pytest.raises(DerivationError):
        Lowering({"x"}).lower(sp.sqrt(-2) + x[n], (n,))
    with pytest.raises(DerivationError, match="Kronecker"):
        Lowering({"x"}).lower(sp.KroneckerDelta(n, 0) * x[n], (n,))


@pytest.mark.parametrize(
    "constant",
    [sp.sqrt(2), 1 / sp.sqrt(2), sp.sqrt(2) / 2, sp.pi, sp.E, 1 / sp.sqrt(2 * sp.pi), sp.sqrt(3)],
    ids=str,
)
def test_irrational_constants_keep_float32(constant):
    code = numpy_code(constant * u)
    assert "np.float64" not in code and "sqrt(2" not in code and "1j" not in code
    value = np.linspace(-3, 3, 7, dtype=np.float32)
    result = run(code, u=value)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, float(constant) * value.astype(np.float64), rtol=1e-6)


def test_gelu_form_keeps_float32_through_erf():
    expr = u * (1 + sp.erf(u / sp.sqrt(2))) / 2
    printer = SymbpNumPyPrinter()
    from symbp.emit.numpy_printer import float_constants

    code = printer.doprint(float_constants(expr))
    assert printer.helpers_used == {"_erf"}
    value = np.linspace(-4, 4, 9, dtype=np.float32)
    result = run(code, u=value)
    assert result.dtype == np.float32
    expected = [x * (1 + math.erf(x / math.sqrt(2))) / 2 for x in value.astype(float)]
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)


# A product with a matrix product as a factor: Python gives ``@`` the precedence of ``*`` and
# ``/`` (left to right) and binds ``**`` tighter, so ``C*(A @ B)`` needs its parentheses.
DOT_IN_EXPRESSIONS = [
    (C * Dot(A, Permute(B)), lambda d: d["C"] * (d["A"] @ d["B"].T)),
    (Dot(A, Permute(B)) ** 2, lambda d: (d["A"] @ d["B"].T) ** 2),
    (Dot(A, Permute(B)) * Dot(C, Permute(B)), lambda d: (d["A"] @ d["B"].T) * (d["C"] @ d["B"].T)),
]


@pytest.mark.parametrize(("expr", "reference"), DOT_IN_EXPRESSIONS, ids=str)
def test_a_matrix_product_inside_a_product_keeps_its_parentheses(expr, reference):
    rng = np.random.default_rng(3)
    arrays = {"A": rng.standard_normal((3, 3)), "B": rng.standard_normal((3, 3)),
              "C": rng.standard_normal((3, 3))}
    np.testing.assert_allclose(run(numpy_code(expr), **arrays), reference(arrays), rtol=1e-13)


def test_a_contraction_with_an_outside_factor_computes_the_sum():
    n, j, k = (sp.Symbol(s, integer=True) for s in "njk")
    F = sp.Symbol("F", integer=True, positive=True)
    x, W, g = (sp.IndexedBase(s, real=True) for s in ("x", "W", "g"))
    expr = sp.Sum(x[n, k] * W[k, j] * g[n, j], (k, 0, F - 1))
    code = numpy_code(Lowering({"x", "W", "g"}).lower(expr, (n, j)))
    rng = np.random.default_rng(4)
    xs, Ws, gs = (rng.standard_normal(shape) for shape in ((2, 3), (3, 3), (2, 3)))
    np.testing.assert_allclose(run(code, x=xs, W=Ws, g=gs), np.einsum("nk,kj,nj->nj", xs, Ws, gs))


@pytest.mark.parametrize("constant", [sp.sqrt(2), sp.sqrt(10)], ids=str)
def test_irrational_constants_print_as_the_nearest_double(constant):
    code = numpy_code(constant * u)
    assert code == f"{float(constant.evalf(40))!r}*u"


def test_integers_beyond_int64_print_as_floats():
    # NumPy refuses a Python int beyond int64 as an operand: u**(10**20) raised OverflowError.
    big = sp.Integer(10) ** 20
    assert numpy_code(u**big) == "u**1e+20"
    assert numpy_code(u**(2**63 - 1)) == f"u**{2**63 - 1}"  # int64 still prints exactly
    values = np.array([0.5, 1.0, -1.0])
    np.testing.assert_array_equal(run(numpy_code(u**big + big * u), u=values),
                                  values**1e20 + 1e20 * values)


# --------------------------------------------------------------------------- with known shapes

# With the arrays' shapes the printer picks cheaper NumPy for the same value: X, Y are a batch
# (M, F), g, k per feature (F,). Each case: expression, exact code, NumPy written here.
M, F = sp.Symbol("M", integer=True, positive=True), sp.Symbol("F", integer=True, positive=True)
X, Y, g, k = (sp.Symbol(name, real=True) for name in ("X", "Y", "g", "k"))
col = sp.Symbol("col", real=True)  # one number per row
SHAPES = {"X": (M, F), "Y": (M, F), "g": (F,), "k": (F,), "col": (M,)}

SHAPED_CASES = [
    # one pass over the batch: the per-feature factors are multiplied together first, and the
    # vector is broadcast along the rows by the helper that hands NumPy long rows
    (g * k * X / M, "_along_rows(np.multiply, X, g*k/M)",
     lambda d: d["X"] * (d["g"] * d["k"] / 4)),
    ((g + k) * X, "_along_rows(np.multiply, X, g + k)", lambda d: d["X"] * (d["g"] + d["k"])),
    (2 * X, "2*X", lambda d: d["X"] * 2),
    # a column broadcast along the rows by einsum (NumPy's multiply runs it in short loops)
    (NewAxis(col, sp.Tuple(1)) * X / M, 'np.einsum("ab,ab->ab", col[:, None]/M, X)',
     lambda d: d["col"][:, None] / 4 * d["X"]),
    # a sum of products over the batch without the product array; column sums by BLAS
    (SumOver(X * Y, sp.Tuple(0)), 'np.einsum("ij,ij->j", X, Y)',
     lambda d: (d["X"] * d["Y"]).sum(axis=0)),
    (SumOver(X * Y, sp.Tuple(1)), 'np.einsum("ij,ij->i", X, Y)',
     lambda d: (d["X"] * d["Y"]).sum(axis=1)),
    (SumOver(X**2, sp.Tuple(0)) / M, 'np.einsum("ij,ij->j", X, X)/M',
     lambda d: (d["X"] ** 2).mean(axis=0)),
    (SumOver(X, sp.Tuple(0)), "np.matmul(np.ones(X.shape[0], X.dtype), X)",
     lambda d: d["X"].sum(axis=0)),
    # row sums stay NumPy's: a @ ones was faster alone but not in the softmax's backward
    (SumOver(X, sp.Tuple(1)), "X.sum(axis=1)", lambda d: d["X"].sum(axis=1)),
    (g * SumOver(X, sp.Tuple(0)), "g*np.matmul(np.ones(X.shape[0], X.dtype), X)",
     lambda d: d["g"] * d["X"].sum(axis=0)),
    (SumOver(g * X, sp.Tuple(0)), "_along_rows(np.multiply, X, g).sum(axis=0)",
     lambda d: (d["g"] * d["X"]).sum(axis=0)),
    # big terms first: ``big - small`` can reuse the big temporary, ``small - big`` cannot
    (-g + X, "X - g", lambda d: d["X"] - d["g"]),
    (g + k * X, "_along_rows(np.multiply, X, k) + g", lambda d: d["g"] + d["k"] * d["X"]),
    (g * Dot(X, Permute(Y)), "g*(X @ Y.T)", None),  # shape (M, M): g does not broadcast
]


def shaped_arrays(seed: int = 5):
    rng = np.random.default_rng(seed)
    return {"X": rng.standard_normal((4, 3)), "Y": rng.standard_normal((4, 3)),
            "g": rng.standard_normal(3), "k": rng.standard_normal(3),
            "col": rng.standard_normal(4), "M": 4, "F": 3}


@pytest.mark.parametrize(("expr", "code", "reference"), SHAPED_CASES,
                         ids=[c[1] for c in SHAPED_CASES])
def test_exact_code_with_shapes(expr, code, reference):
    assert SymbpNumPyPrinter(shapes=SHAPES).doprint(expr) == code


@pytest.mark.parametrize(("expr", "code", "reference"),
                         [c for c in SHAPED_CASES if c[2] is not None],
                         ids=[c[1] for c in SHAPED_CASES if c[2] is not None])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_code_with_shapes_computes_the_reference(expr, code, reference, dtype):
    arrays = {name: (a.astype(dtype) if isinstance(a, np.ndarray) else a)
              for name, a in shaped_arrays().items()}
    result = run(SymbpNumPyPrinter(shapes=SHAPES).doprint(expr), **arrays)
    assert np.asarray(result).dtype == dtype
    expected = reference({n: np.asarray(a, dtype=np.float64) for n, a in arrays.items()})
    tol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(result, expected, rtol=tol, atol=tol)


def test_array_shapes_follow_the_array_operations():
    from symbp.emit.numpy_printer import array_shape, is_smaller

    assert array_shape(SumOver(X * g, sp.Tuple(0)), SHAPES) == (F,)
    assert array_shape(NewAxis(SumOver(X, sp.Tuple(1)), sp.Tuple(1)), SHAPES) == (M, 1)
    assert array_shape(Dot(Permute(X), Y), SHAPES) == (F, F)
    assert array_shape(X - NewAxis(MaxOver(X, sp.Tuple(1)), sp.Tuple(1)), SHAPES) == (M, F)
    assert array_shape(Dot(X, Y) + g, {**SHAPES, "Y": (F, M)}) is None  # (M, M) + (F,)
    assert is_smaller(g * k, (M, F), SHAPES) and not is_smaller(g * X, (M, F), SHAPES)
    assert not is_smaller(X, (M, F), {"X": None})  # unknown: never treated as small
    # Contractions: einsum's output letters, tensordot's free axes in the printed order.
    assert array_shape(Einsum(sp.Symbol("ab,ab->b"), X, Y), SHAPES) == (F,)
    assert array_shape(Einsum(sp.Symbol("ab,cb->ca"), X, Y), {**SHAPES, "Y": (N, F)}) == (N, M)
    assert array_shape(Einsum(sp.Symbol("abc,ab->c"), X, Y), SHAPES) is None  # rank mismatch
    td = TensorDot(X, Y, sp.Tuple(0), sp.Tuple(1), sp.Tuple(1, 0))
    assert array_shape(td, {**SHAPES, "Y": (N, M)}) == (N, F)
    assert is_smaller(Einsum(sp.Symbol("ab,ab->b"), X, Y), (M, F), SHAPES)


def test_group_sum_of_a_product_is_one_einsum():
    # group norm's sum over a group of dy_gamma*xhat: einsum over (N, groups, -1) views, no
    # product array; the same numbers as the product summed group by group (to rounding)
    from symbp.derivation.groups import GroupSum

    n, c, h, w = (sp.Symbol(s, integer=True, positive=True) for s in ("n", "C", "H", "W"))
    P, Q = sp.Symbol("P", real=True), sp.Symbol("Q", real=True)
    printer = SymbpNumPyPrinter(shapes={"P": (n, c, h, w), "Q": (n, c, h, w)})
    code = printer.doprint(GroupSum(P * Q, n, 2))
    assert code == 'np.einsum("ijk,ijk->ij", P.reshape(n, 2, -1), Q.reshape(n, 2, -1))'
    assert printer.doprint(GroupSum(P**2, n, 2)).startswith('np.einsum("ijk,ijk->ij", P.')
    plain = SymbpNumPyPrinter().doprint(GroupSum(P * Q, n, 2))  # shapes unknown
    assert plain == "(P*Q).reshape(n, 2, -1).sum(axis=2)"
    rng = np.random.default_rng(4)
    p, q = rng.standard_normal((3, 4, 2, 2)), rng.standard_normal((3, 4, 2, 2))
    expected = np.stack([(p * q)[:, :2].sum(axis=(1, 2, 3)), (p * q)[:, 2:].sum(axis=(1, 2, 3))],
                        axis=1)
    np.testing.assert_allclose(run(code, P=p, Q=q, n=3), expected, rtol=1e-13)
