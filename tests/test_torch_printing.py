"""How the torch printer prints element-wise passes over big arrays (issue 26, part 4): a sum
of per-channel multiples of big arrays is one new tensor updated in place
(``torch.addcmul(c, k, B)`` then ``.addcmul_(k2, B2)``), a temporary nothing reads afterwards
lends its memory, and a convolution's bias is added in its output's memory. Oracle: the same
expression evaluated the general way (sympy's own lambdify with torch), in float64, and the
generated NumPy module (tests/test_torch_target.py compares every example)."""

from pathlib import Path

import pytest
import sympy as sp

torch = pytest.importorskip("torch")

from symbp import codegen  # noqa: E402
from symbp.declare.spec import load_spec  # noqa: E402
from symbp.emit.torch_printer import SymbpTorchPrinter  # noqa: E402

N, C, H, W = sp.symbols("N C H W", integer=True, positive=True)
SHAPES = {"dy": (N, C, H, W), "xhat": (N, C, H, W), "x": (N, C, H, W),
          "k": (C, 1, 1), "c": (C, 1, 1), "s": (C, 1, 1)}
dy, xhat, x, k, c, s = (sp.Symbol(n) for n in SHAPES)


def _run(expr, donor=None):
    """The chain the printer writes for ``expr``, run on random float64 tensors, and the
    expression's value computed the general way (every operation a new tensor)."""
    printer = SymbpTorchPrinter(shapes=SHAPES)
    chain = printer.chained_pass(expr, donor)
    assert chain is not None, expr
    start, updates, _ = chain
    generator = torch.Generator().manual_seed(0)
    values = {name: torch.randn(*(3 if d == N else 4 if d == C else 5 if d == H else 6
                                   if d == W else 1 for d in shape),
                                dtype=torch.float64, generator=generator)
              for name, shape in SHAPES.items()}
    general = sp.lambdify(list(SHAPES), expr, "torch")(*values.values())
    inputs = {name: value.clone() for name, value in values.items()}
    namespace = {"torch": torch, **inputs}
    exec(f"out = {start}\n" + "".join(f"out{u}\n" for u in updates), namespace)
    return start, updates, namespace, values, general


@pytest.mark.parametrize("expr", [
    dy + k * xhat,  # one addcmul
    c + k * xhat + s * dy,  # batch norm's input gradient, spread
    s * (dy - k * xhat - c),  # a small factor outside the sum
    dy - xhat - x,  # three bare arrays: their sum, then the third
    2 * dy + k * xhat,  # a number coefficient
    c - 3 * xhat,
])
def test_a_chain_computes_the_expression_and_leaves_its_arguments(expr):
    start, updates, namespace, values, general = _run(expr)
    torch.testing.assert_close(namespace["out"], general, rtol=0, atol=1e-12)
    for name, value in values.items():  # nothing read was written to
        assert torch.equal(namespace[name], value), (name, start, updates)
    assert len(updates) <= 2  # a pass per big term after the first call


def test_a_dead_temporary_lends_its_memory():
    start, updates, namespace, values, general = _run(x + k * dy, donor=x)
    assert start.startswith("x.addcmul_(")
    torch.testing.assert_close(namespace["out"], general, rtol=0, atol=1e-12)
    assert namespace["out"].data_ptr() == namespace["x"].data_ptr()


def test_a_plain_sum_of_two_arrays_stays_plain():
    assert SymbpTorchPrinter(shapes=SHAPES).chained_pass(dy + xhat) is None


def test_batch_norm_backward_makes_one_new_tensor():
    """The printed batch norm: no einsum (torch's copies both operands), the input gradient
    built in one tensor by addcmul, the sums of products by _dot_sum."""
    source = codegen(load_spec(Path(__file__).resolve().parents[1] / "examples" / "mlp_bn.toml"),
                     target="torch")
    backward = source.split("def batchnorm_backward")[1].split("\ndef ")[0]
    assert "torch.einsum(" not in source
    assert backward.count("torch.addcmul(") == 1 and "_dot_sum(dy, xhat" in backward


def test_a_matrix_product_plus_a_row_is_one_addmm():
    """``x @ W + b`` (linear's forward) is torch.addmm(b, x, W): the same value, b added by the
    matrix product's own call."""
    from symbp.derivation.array_ops import Dot

    n, i, j = sp.symbols("n i j", integer=True, positive=True)
    shapes = {"x": (n, i), "W": (i, j), "b": (j,)}
    x2, w2, b2 = (sp.Symbol(name) for name in shapes)
    start, updates, call = SymbpTorchPrinter(shapes=shapes).chained_pass(Dot(x2, w2) + b2)
    assert start == "torch.addmm(b, x, W)" and not updates and call[0] == "torch.addmm"
    generator = torch.Generator().manual_seed(1)
    values = {"x": torch.randn(5, 4, dtype=torch.float64, generator=generator),
              "W": torch.randn(4, 3, dtype=torch.float64, generator=generator),
              "b": torch.randn(3, dtype=torch.float64, generator=generator)}
    got = eval(start, {"torch": torch, **values})  # noqa: S307 - the printer's own output
    torch.testing.assert_close(got, values["x"] @ values["W"] + values["b"], rtol=0, atol=1e-12)


def test_a_step_factor_multiplies_as_bytes_not_bools():
    """``dy*step(y)`` (ReLU's derived backward) and ``dy*y_positive`` (its kept mask) print the
    0/1 factor as its bytes, ``.view(torch.uint8)``: torch converts bool to the float type element
    by element, uint8 in its vectorised loop. The value is the product's, exactly (0 and 1 are
    exact in every float type), in dy's dtype; never multiplied by a Python number (a size N:
    uint8 times it stays uint8 and wraps), and outside a product the mask stays bool."""
    from symbp.derivation.arrays import Step

    y, mask = sp.Symbol("y"), sp.Symbol("y_positive")
    shapes = {"dy": (N, C, H, W), "y": (N, C, H, W), "y_positive": (N, C, H, W)}
    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        values = {"dy": torch.randn(3, 2, 4, 4, dtype=dtype, generator=generator),
                  "y": torch.randn(3, 2, 4, 4, dtype=dtype, generator=generator).clamp(min=0),
                  "N": 300}
        values["y_positive"] = values["y"] > 0
        expected = values["dy"] * torch.heaviside(values["y"], torch.zeros((), dtype=dtype))
        # N = 300: uint8 times it would wrap (300 mod 256); bool times it is int64
        for expr, bytes_ in ((dy * Step(y), True), (dy * mask, True),
                             (N * dy * Step(y), None), (N * dy * mask, None)):
            printer = SymbpTorchPrinter(shapes=shapes)
            printer.bool_arrays = frozenset({"y_positive"})
            text = printer.doprint(expr)
            assert bytes_ is None or (".view(torch.uint8)" in text) == bytes_, text
            got = eval(text, {"torch": torch, **values})  # noqa: S307 - the printer's output
            factor = 300 if expr.has(N) else 1
            assert got.dtype == dtype
            torch.testing.assert_close(got, factor * expected, rtol=0, atol=0)
    printer = SymbpTorchPrinter(shapes=shapes)
    printer.bool_arrays = frozenset({"y_positive"})
    assert ".view(" not in printer.doprint(1 - mask)  # no product: bool (torch refuses -)
    # a number times the mask alone: bool promotes to int64 (300), where uint8 would wrap (44)
    text = printer.doprint(N * mask)
    got = eval(text, {"torch": torch, **values})  # noqa: S307 - the printer's output
    assert torch.equal(got, 300 * values["y_positive"].long()), text


def test_relu_backward_multiplies_by_bytes():
    source = codegen(load_spec(Path(__file__).resolve().parents[1] / "examples" / "lenet.toml"),
                     target="torch")
    assert "dx = dy*y_positive.view(torch.uint8)" in source  # the kept mask (convolutions')
    assert "dx = dy*(y > 0).view(torch.uint8)" in source  # the kept output (linear layers')
    assert "y_positive = (y > 0)\n" in source  # kept as bool, one byte an element
