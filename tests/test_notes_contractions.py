"""The notes print a tensor contraction as the matrix product it is, or in index form.

The engine lowers a sum of products over arrays of more than two axes (a linear layer on
``(N, T, D)``, layer norm's ``sum_d gamma_d dy_ntd``, attention's projections) to one
``TensorDot``; the notes printed that node as sympy's ``\\dot{Tensor}(...)``. Now a contraction
that is a matrix product prints as one (``h W``), checked here against NumPy's ``tensordot``
on random arrays, and any other contraction leaves its formula in index form (a sum).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from render.tools import (
    compile_latex,
    extract_markdown_math,
    have_node,
    have_pdflatex,
    katex_errors,
)

from symbp.declare.spec import load_spec
from symbp.derivation.array_ops import Dot, Permute, TensorDot
from symbp.derivation.network import derive_network
from symbp.emit.notes import render_notes
from symbp.emit.notes_math import as_matrix_product

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
N, T, D, F = 3, 4, 5, 6


def _evaluate(expr, arrays):
    """A matrix product (``Dot``, ``Permute``) with NumPy, by its meaning: ``@`` and ``.T``."""
    if isinstance(expr, sp.Symbol):
        return arrays[expr.name]
    if isinstance(expr, Permute):
        return _evaluate(expr.args[0], arrays).T
    assert isinstance(expr, Dot)
    return _evaluate(expr.args[0], arrays) @ _evaluate(expr.args[1], arrays)


CONTRACTIONS = [  # (a, b, axes_a, axes_b, order): each a tensordot the engine prints
    ("W", "h", (0,), (2,), (1, 2, 0)),  # a linear layer on (N, T, D): h W
    ("V", "dz", (1,), (2,), (1, 2, 0)),  # its input gradient: dz V^T
    ("g", "h", (0,), (2,), (0, 1)),  # layer norm's sum_d g_d h_ntd: h g
    ("x", "dz2", (0,), (0,), (0, 1)),  # a 2-D weight gradient: x^T dz
    ("h", "W", (2,), (0,), (0, 1, 2)),  # h W, operands in order
]
SHAPES = {"W": (D, F), "h": (N, T, D), "V": (D, F), "dz": (N, T, F), "g": (D,), "x": (N, D),
          "dz2": (N, F), "Wk": (D, 2, F), "dk": (N, 2, T, F)}


@pytest.mark.parametrize("case", CONTRACTIONS, ids=lambda c: f"{c[0]}.{c[1]}")
def test_a_contraction_that_is_a_matrix_product_prints_as_one(case):
    a, b, axes_a, axes_b, order = case
    node = TensorDot(sp.Symbol(a), sp.Symbol(b), sp.Tuple(*axes_a), sp.Tuple(*axes_b),
                     sp.Tuple(*order))
    product = as_matrix_product(node, SHAPES)
    assert product is not None
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    expected = np.tensordot(arrays[a], arrays[b], (axes_a, axes_b)).transpose(order)
    np.testing.assert_allclose(_evaluate(product, arrays), expected, rtol=1e-12)


@pytest.mark.parametrize("case", [
    ("Wk", "dk", (1, 2), (1, 3), (1, 2, 0)),  # two axes at once (attention's projections)
    ("W", "h", (0,), (2,), (0, 1, 2)),  # the result's axes (O, N, T): no row per sample
    ("h", "dk", (2,), (0,), (0, 1, 2, 3, 4)),  # h's last axis against a 4-axis array
], ids=["two_axes", "axes_moved", "right_not_a_matrix"])
def test_any_other_contraction_is_no_matrix_product(case):
    a, b, axes_a, axes_b, order = case
    node = TensorDot(sp.Symbol(a), sp.Symbol(b), sp.Tuple(*axes_a), sp.Tuple(*axes_b),
                     sp.Tuple(*order))
    assert as_matrix_product(node, {**SHAPES, "dk": (D, 2, T, F, 1)}) is None


@pytest.fixture(scope="module")
def attention_notes():
    derivation = derive_network(load_spec(EXAMPLES / "attention_block.toml"))
    return {fmt: render_notes(derivation, fmt=fmt) for fmt in ("md", "tex")}


@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_attention_notes_print_no_sympy_function_names(attention_notes, fmt):
    text = attention_notes[fmt]
    assert "Tensor" not in text and r"\dot{" not in text
    # the MLP's linear layers on (N, T, D) read as the network's 2-D head does: h W + b
    assert (r"\mathbf{h}^{(2.2)} &= \mathbf{h}^{(2.1)} \mathbf{W}^{(2.2)} "
            r"+ \mathbf{b}^{(2.2)}") in text
    assert r"\mathbf{h}^{(4)} &= \mathbf{h}^{(3)} \mathbf{W}^{(4)} + \mathbf{b}^{(4)}" in text
    # its input gradient is dz W^T, as for a 2-D linear layer
    assert (r"\frac{\partial J}{\partial \mathbf{x}} &= \frac{\partial J}{\partial \mathbf{z}} "
            r"\mathbf{W}^{\top}") in text
    # attention's projection gradients sum over two axes: index form, a sum over m and t''
    assert r"\frac{\partial J}{\partial \mathrm{Wq}_{dhe}} &= \sum_{m,t''}" in text
    # a sum over (n, t) of a 3-axis array is no 1^T A 1
    assert (r"\frac{\partial J}{\partial \mathbf{b}} &= \mathbf{1}^{\top} \frac{\partial J}"
            r"{\partial \mathbf{z}} \mathbf{1}") not in text
    assert "sliding windows" not in text  # attention has none


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
def test_attention_notes_compile(attention_notes, tmp_path):
    ok, log, _ = compile_latex(attention_notes["tex"], tmp_path)
    assert ok, log[-3000:]


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
def test_attention_notes_parse_with_katex(attention_notes):
    assert katex_errors(extract_markdown_math(attention_notes["md"])) == []
