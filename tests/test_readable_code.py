"""Generated code that reads like its formulas (issue 23, item 6) and the names it uses (item 5).

Text is asserted exactly here only where the text is the feature (a value's readable name, a
parameter named as the user wrote it, a docstring's reading); what the code does is checked by
running it (values, calls counted while it runs, the AST)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symbp
from symbp import naming
from symbp.checking.gradcheck import load_module, make_inputs
from symbp.declare.net import Net
from symbp.derivation.arrays import Einsum, MaxOver, NewAxis, SumOver
from symbp.emit.module import generate_module
from symbp.emit.value_names import GENERIC, describe, value_name

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

dy, xhat, z, x, mu = sp.symbols("dy xhat z x mu")
N, H = sp.symbols("N H_in", integer=True, positive=True)


@pytest.mark.parametrize(
    ("expr", "name"),
    [
        (SumOver(dy, sp.Tuple(0)), "sum_dy"),
        (SumOver(dy * xhat, sp.Tuple(0)), "sum_dy_xhat"),
        (Einsum(sp.Symbol("ij,ij->j"), dy, xhat), "sum_dy_xhat"),
        (MaxOver(z, sp.Tuple(1)), "max_z"),
        # exp of z shifted by its own row maximum: the stable form of exp(z)
        (sp.exp(z - NewAxis(sp.Symbol("max_z"), sp.Tuple(1))), "exp_z"),
        (x - mu, "x_minus_mu"),
        (x + NewAxis(-mu, sp.Tuple(1)), "x_minus_mu"),
        (sp.StrictGreaterThan(x, 0), "x_positive"),
        (1 / (N * H), "inv_count"),
    ],
)
def test_common_values_are_named_after_what_they_compute(expr, name):
    assert describe(expr) == name


def test_value_names_are_fresh_identifiers():
    taken = {"sum_dy", "x"}
    first = value_name(SumOver(dy, sp.Tuple(0)), taken)
    second = value_name(SumOver(dy, sp.Tuple(0)), taken)
    assert (first, second) == ("sum_dy_2", "sum_dy_3")
    # nothing to read off (a window product), or too long: the generic name, numbered
    unknown = sp.Function("Opaque")(x, z)
    assert value_name(unknown, taken) == GENERIC
    assert value_name(unknown, taken) == f"{GENERIC}_2"
    assert value_name(sp.Symbol("s" * 40) * dy, taken) == f"{GENERIC}_3"
    # never a builtin or a keyword
    assert value_name(sp.Symbol("sum"), set()) == "sum_2"


def _assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_no_numbered_common_values_in_generated_modules(spec):
    source = symbp.codegen(symbp.load_spec(spec))
    assert not re.search(r"\bcommon\d+\b", source)
    assert all(name.isidentifier() for name in _assigned_names(source))


def test_batchnorm_backward_reads_like_its_formulas():
    """dbeta is the sum of dy over the batch and dgamma the sum of dy*xhat: the generated code
    says so by its names, and the values are those sums."""
    net = Net([symbp.linear(6), symbp.batchnorm()], input_features=3, loss="mse")
    source = generate_module(net)
    body = source.split("def batchnorm_backward(", 1)[1].split("\ndef ", 1)[0]
    assert "dgamma = sum_dy_xhat" in body and "dbeta = sum_dy" in body
    namespace: dict = {}
    exec(compile(source, "generated", "exec"), namespace)
    rng = np.random.default_rng(0)
    g, h, invstd, gamma = (rng.standard_normal(s) for s in ((5, 6), (5, 6), 6, 6))
    _, dgamma, dbeta = namespace["batchnorm_backward"](g, invstd, h, gamma)
    np.testing.assert_allclose(dbeta, g.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dgamma, (g * h).sum(axis=0), rtol=1e-12)


def test_user_names_of_hyper_parameters_are_kept():
    """batchnorm(eps=...) and leaky_relu(slope=...) take ``eps`` and ``slope`` in the generated
    functions, as the user wrote them."""
    net = Net(
        [symbp.linear(4), symbp.batchnorm(eps=1e-3), symbp.leaky_relu(slope=0.2)],
        input_features=3,
        loss="mse",
    )
    source = generate_module(net)
    assert "def batchnorm_forward(x, gamma, beta, *, eps" in source
    assert "eps=0.001" in source and "epsilon" not in source
    assert re.search(r"def leaky_relu_forward\(x, \*, slope", source)
    assert "slope=0.2" in source


def test_generated_names_come_from_the_naming_module():
    # (a ReLU before a linear layer keeps its output, which that layer keeps: relu_*, not
    # relu_mask_*)
    net = Net([symbp.linear(4), symbp.relu(), symbp.linear(2)], input_features=3, loss="mse")
    source = generate_module(net)
    for stem in ("linear", "relu", "mse"):
        assert f"def {naming.forward_function(stem)}(" in source
        assert f"def {naming.backward_function(stem)}(" in source
    assert naming.adjoint("x") == "dx" and naming.predict_function("bn") == "bn_predict"


def _docstring(source: str, name: str) -> str:
    return source.split(f"def {name}(", 1)[1].split('"""')[1]


def test_docstrings_name_the_users_layer():
    """A custom activation's functions say its name (``mish``), not "activation"; a built-in
    layer's say its type."""
    net = Net(
        [symbp.linear(4), symbp.activation("x*tanh(log(1 + exp(x)))", name="mish")],
        input_features=3,
        loss="mse",
    )
    source = generate_module(net)
    assert _docstring(source, "mish_forward").startswith("Forward pass of mish;")
    assert _docstring(source, "mish_backward").startswith("Backward pass of mish,")
    assert _docstring(source, "linear_forward").startswith("Forward pass of linear;")
    assert "pass of activation" not in source


def test_conv_and_pooling_docstrings_read_their_gradients():
    """Beside the index formulas, the reading the derivation gives: a convolution's input
    gradient is a full convolution of dy with the flipped kernel (stride 1), its kernel
    gradient a correlation of the input with dy; max pooling routes dy to each window's
    first arg-max."""
    net = Net(
        [symbp.conv2d(3, 3), symbp.relu(), symbp.maxpool2d(2), symbp.flatten(), symbp.linear(2)],
        input_shape=(2, 8, 8),
        loss="mse",
    )
    source = generate_module(net)
    conv = _docstring(source, "conv2d_backward")
    assert "dx: a full convolution of dy with the flipped kernel W" in conv
    assert "dW: a correlation of x with dy" in conv
    pool = _docstring(source, "maxpool2d_strided_backward")
    assert "dx: dy routed to the (first) arg-max of each window." in pool
    # A layer without windows has no such reading.
    assert "dx:" not in _docstring(source, "linear_backward")


def test_one_function_per_math_whatever_the_rank():
    """ReLU on images and on feature vectors prints the same code: one relu_forward /
    relu_backward pair serves both (no relu_2); the gradients still match finite differences.
    Batch norm's statistics are per feature on one and per channel on the other: two
    functions."""
    net = Net(
        [symbp.conv2d(2, 3), symbp.relu(), symbp.flatten(), symbp.linear(5), symbp.relu(),
         symbp.linear(2)],
        input_shape=(1, 6, 6),
        loss="mse",
    )
    source = generate_module(net)
    tree = ast.parse(source)
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    called = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert defined.count("relu_forward") == 1 and not any("relu_2" in d for d in defined)
    assert called.count("relu_forward") == 2 and called.count("relu_backward") == 2
    # the docstring's formula is the feature here: it reads for any rank
    assert "    y[...] = Max(0, x[...])\n" in source
    assert symbp.check(net).passed
    norms = Net(
        [symbp.conv2d(2, 3), symbp.batchnorm(), symbp.flatten(), symbp.linear(5),
         symbp.batchnorm(), symbp.linear(2)],
        input_shape=(1, 6, 6),
        loss="mse",
    )
    two = [node.name for node in ast.parse(generate_module(norms)).body
           if isinstance(node, ast.FunctionDef)]
    assert "batchnorm_forward" in two and "batchnorm_2_forward" in two


def test_no_shift_by_nothing():
    """A stride-1 convolution's scattered input gradient already has the input's size
    ((H_out - 1) + (K_h - 1) + 1 = H_in): it is not copied through ``_shifted`` by (0, 0).
    Max pooling by 2 keeps its shift, which pads the rows its windows never read (an odd
    height), and both gradients still match finite differences (a 7x7 image into the pool)."""
    net = Net(
        [symbp.conv2d(2, 3), symbp.relu(), symbp.maxpool2d(2), symbp.flatten(),
         symbp.linear(2)],
        input_shape=(1, 9, 9),
        loss="mse",
    )
    module = load_module(generate_module(net))
    calls = []  # per call of _shifted: whether it moved or cropped anything
    shifted = module._shifted

    def recorded(a, offsets, sizes):
        calls.append(any(offsets) or tuple(sizes) != a.shape[a.ndim - len(offsets):])
        return shifted(a, offsets, sizes)

    module._shifted = recorded
    params, x, y = make_inputs(net, module, batch=2, seed=0)
    module.loss_and_grads(params, x, y)
    assert calls and all(calls)  # the pool's shift runs; no call shifts by nothing
    assert symbp.check(net).passed
