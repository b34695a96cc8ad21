"""The study-notes export: exact printer strings, real renderers, and the engine's formulas.

* The printer is specified by exact strings on small expressions (index and whole-array form,
  both notations).
* Every example's LaTeX document compiles with pdflatex without errors or overfull boxes, and
  every math block of its Markdown parses with KaTeX in strict mode: real renderers, not the
  code's own opinion of its output.
* The formulas in the notes are the engine's: the engine's compact batch-norm gradient, printed
  by the printer, occurs verbatim in the document, and so does every layer's derived VJP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp
from render.tools import (
    compile_latex,
    extract_markdown_math,
    have_node,
    have_pdflatex,
    katex_errors,
    overfull_boxes,
)

from symbp.declare.forms import N, index
from symbp.declare.spec import load_spec, parse_spec
from symbp.derivation.arrays import Dot, Permute, Step, SumOver
from symbp.derivation.network import derive_network
from symbp.emit.latex_printer import AtLayer, Delta, Jacobian, latex
from symbp.emit.notes import Notes, make_notes, render_notes

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
#: The examples rendered by pdflatex and KaTeX in the default run: images (conv, batch norm,
#: pooling, a strided convolution) and a residual block; the others run with ``-m slow``.
RENDERED = ("cnn_bn", "residual_mlp")


def _rendered_first(paths):
    """``paths`` as pytest params, those not in :data:`RENDERED` marked slow."""
    return [pytest.param(p, id=p.stem, marks=() if p.stem in RENDERED else pytest.mark.slow)
            for p in paths]

BN_SPEC = """
name = "bn_net"
input = { features = 4 }
loss = "mse"

[[layers]]
type = "linear"
name = "fc"
out = 3

[[layers]]
type = "batchnorm"
name = "bn"

[[layers]]
type = "sigmoid"
"""

n, j, m = index("n"), index("j"), index("m")
x, dy, W = sp.IndexedBase("x"), sp.IndexedBase("dy"), sp.IndexedBase("W")
ARRAYS = {"x", "y", "W", "xhat", "invstd", "gamma", "var"}


# -- the printer, exact strings ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "settings", "expected"),
    [
        (x[n, j], {}, "x_{nj}"),
        (sp.IndexedBase("xhat")[n, j], {}, r"\hat{x}_{nj}"),
        (sp.IndexedBase("gamma")[j], {}, r"\gamma_{j}"),
        (sp.IndexedBase("invstd")[j], {}, r"\tilde{\sigma}^{-1}_{j}"),
        (sp.IndexedBase("invstd")[j] ** 2, {}, r"\tilde{\sigma}^{-2}_{j}"),
        (sp.IndexedBase("var")[j], {}, r"\sigma^{2}_{j}"),
        (dy[n, j], {}, r"\frac{\partial J}{\partial y_{nj}}"),
        (dy[n, j], {"notation": "cs231n"}, r"\mathrm{d}y_{nj}"),
        (sp.Sum(x[m, j], (m, 0, N - 1)) / N, {}, r"\frac{1}{N} \sum_{m} x_{mj}"),
        (sp.Heaviside(x[n, j], 0), {}, r"\mathbb{1}\left[x_{nj} > 0\right]"),
        (
            sp.Heaviside(x[n, j], 0),
            {"indicator": r"\mathbb{I}"},
            r"\mathbb{I}\left[x_{nj} > 0\right]",
        ),
        (1 - sp.Symbol("y"), {}, "1 - y"),
    ],
)
def test_printer_index_form(expr, settings, expected):
    assert latex(expr, arrays=ARRAYS, **settings) == expected


def _s(name):
    return sp.Symbol(name, real=True)


@pytest.mark.parametrize(
    ("expr", "notation", "expected"),
    [
        (Dot(_s("dz"), Permute(_s("W"))), "cs231n", r"\mathrm{d}\mathbf{z} \mathbf{W}^{\top}"),
        (
            Dot(Permute(_s("x")), _s("dz")),
            "d2l",
            r"\mathbf{x}^{\top} \frac{\partial J}{\partial \mathbf{z}}",
        ),
        (SumOver(_s("dz"), sp.Tuple(0)), "cs231n", r"\mathbf{1}^{\top} \mathrm{d}\mathbf{z}"),
        (
            _s("dy") * _s("y") * (1 - _s("y")),
            "cs231n",
            r"\mathrm{d}\mathbf{y} \odot \mathbf{y} \odot \left(1 - \mathbf{y}\right)",
        ),
        (
            _s("dy") * Step(_s("y")),
            "cs231n",
            r"\mathrm{d}\mathbf{y} \odot \mathbb{1}\left[\mathbf{y} > 0\right]",
        ),
        (_s("y") ** 2, "d2l", r"\mathbf{y}^{\odot 2}"),
        (_s("gamma"), "d2l", r"\boldsymbol{\gamma}"),
        (AtLayer(sp.Symbol("W"), sp.Symbol("2")), "d2l", r"\mathbf{W}^{(2)}"),
        (Permute(AtLayer(sp.Symbol("h"), sp.Symbol("1"))), "d2l", r"\mathbf{h}^{(1)\top}"),
        (Delta(sp.Symbol("3")), "d2l", r"\boldsymbol{\delta}^{(3)}"),
        (
            Jacobian(
                AtLayer(sp.Symbol("h"), sp.Symbol("2")), AtLayer(sp.Symbol("h"), sp.Symbol("1"))
            ),
            "d2l",
            r"\frac{\partial \mathbf{h}^{(2)}}{\partial \mathbf{h}^{(1)}}",
        ),
    ],
)
def test_printer_whole_array_form(expr, notation, expected):
    assert latex(expr, arrays=ARRAYS | {"z", "h"}, whole=True, notation=notation) == expected


# Real powers, written as in print: a root as a root (sympy's own \sqrt{x}, \sqrt[3]{x},
# \frac{1}{\sqrt{x}}), any other exponent as a superscript, a rational one as sympy writes it
# (x^{\frac{3}{2}}, as batch norm's (\sigma^2 + \epsilon)^{\frac{3}{2}} in the gallery), on
# an array's symbol like its integer powers (x^{2}_{nj}); element-wise in whole-array form.
h1 = AtLayer(sp.Symbol("h"), sp.Symbol("1"))
third, half = sp.Rational(1, 3), sp.Rational(1, 2)


@pytest.mark.parametrize(
    ("expr", "whole", "expected"),
    [
        (x[n, j] ** sp.Rational(3, 2), False, r"x^{\frac{3}{2}}_{nj}"),
        (sp.sqrt(x[n, j]), False, r"\sqrt{x_{nj}}"),
        (x[n, j] ** third, False, r"\sqrt[3]{x_{nj}}"),
        (1 / sp.sqrt(x[n, j]), False, r"\frac{1}{\sqrt{x_{nj}}}"),
        # d/dx x^(1/3) = 1 / (3 x^(2/3)); it recursed without end
        (sp.diff(x[n, j] ** third, x[n, j]), False, r"\frac{1}{3 x^{\frac{2}{3}}_{nj}}"),
        (x[n, j] ** x[n, j], False, r"x^{x_{nj}}_{nj}"),
        (x[n, j] ** sp.pi, False, r"x^{\pi}_{nj}"),
        # a symbol with a power of its own: sqrt(sigma^2) = sigma, (sigma~^-1)^(1/2)
        (sp.sqrt(sp.IndexedBase("var")[j]), False, r"\sigma_{j}"),
        (sp.sqrt(sp.IndexedBase("invstd")[j]), False, r"\tilde{\sigma}^{- \frac{1}{2}}_{j}"),
        # network-level nodes are sympy functions: sympy's _print_Pow handed them `exp=`
        (h1 ** sp.Rational(3, 2), True, r"\left(\mathbf{h}^{(1)}\right)^{\odot \frac{3}{2}}"),
        (h1**h1, True, r"\left(\mathbf{h}^{(1)}\right)^{\odot \mathbf{h}^{(1)}}"),
        (h1**third, True, r"\sqrt[3]{\mathbf{h}^{(1)}}"),
        (h1 ** (-half), True, r"\frac{1}{\sqrt{\mathbf{h}^{(1)}}}"),
        (h1 ** sp.Rational(3, 2), False, r"\left(h^{(1)}\right)^{\frac{3}{2}}"),
        # an element-wise power e - 1, not (element-wise e) - 1
        (_s("y") ** (sp.E - 1), True, r"\mathbf{y}^{\odot \left(e - 1\right)}"),
        (Delta(sp.Symbol("2")) ** 2, True, r"\left(\boldsymbol{\delta}^{(2)}\right)^{\odot 2}"),
        (
            Step(_s("y")) ** 2,
            True,
            r"\left(\mathbb{1}\left[\mathbf{y} > 0\right]\right)^{\odot 2}",
        ),
    ],
)
def test_printer_real_powers(expr, whole, expected):
    assert latex(expr, arrays=ARRAYS | {"h"}, whole=whole) == expected


def test_printer_puts_a_scalar_coefficient_in_front_of_a_long_sum():
    gamma, invstd, xhat = (sp.IndexedBase(s) for s in ("gamma", "invstd", "xhat"))
    expr = (N * dy[n, j] - sp.Sum(dy[m, j], (m, 0, N - 1))) * gamma[j] * invstd[j] / N
    assert latex(expr, arrays=ARRAYS, notation="cs231n") == (
        r"\frac{\gamma_{j} \tilde{\sigma}^{-1}_{j}}{N} "
        r"\left(N \mathrm{d}y_{nj} - \sum_{m} \mathrm{d}y_{mj}\right)"
    )
    assert xhat  # the names used above are the engine's


# -- the notes hold the engine's formulas ----------------------------------------------------------
@pytest.fixture(scope="module")
def bn_derivation():
    return derive_network(parse_spec(BN_SPEC))


@pytest.mark.parametrize("fmt", ["tex", "md"])
@pytest.mark.parametrize("notation", ["d2l", "cs231n"])
def test_notes_contain_the_engines_batchnorm_gradient(bn_derivation, fmt, notation):
    doc = render_notes(bn_derivation, fmt=fmt, notation=notation)
    bn = bn_derivation.layer("bn").derivation
    arrays = set(bn.form.arrays)
    indicator = r"\mathbb{I}" if fmt == "tex" else r"\mathbb{1}"
    settings = {"arrays": arrays, "notation": notation, "indicator": indicator}
    settings["loss_symbol"] = "J" if notation == "d2l" else "L"
    compact = bn.vjp["x"]
    printed = latex(compact.lhs, **settings) + " &= " + latex(compact.expr, **settings)
    assert printed in doc
    # the compact form is gamma * invstd / N times a sum: the engine's closed form
    assert compact.expr.has(sp.IndexedBase("gamma", real=True)[j])
    for staged in bn.staged:  # and every staged step
        assert latex(staged.expr, **settings) in doc
    assert "both are exact" in doc and "so they are equal" in doc


def test_every_vjp_of_every_layer_is_in_the_notes(bn_derivation):
    doc = render_notes(bn_derivation, fmt="md")
    for derived in bn_derivation.layers:
        settings = {"arrays": set(derived.derivation.form.arrays)}
        for adjoint in derived.derivation.vjp.values():
            assert latex(adjoint.expr, **settings) in doc


def test_sigmoid_bound_comes_from_sympy(bn_derivation):
    doc = render_notes(bn_derivation, fmt="md")
    assert r"y \left(1 - y\right)" in doc
    assert r"The largest value of the derivative is $\frac{1}{4}$." in doc


def test_steps_add_the_engines_intermediate_steps(bn_derivation):
    plain = render_notes(bn_derivation, fmt="md")
    detailed = render_notes(bn_derivation, fmt="md", steps=True)
    for description, _ in bn_derivation.layer("bn").derivation.steps["x"]:
        assert description in detailed
    assert "intermediate gradients substituted" not in plain


def test_fragment_has_no_preamble(bn_derivation):
    fragment = render_notes(bn_derivation, fmt="tex", fragment=True)
    assert r"\documentclass" not in fragment and r"\end{document}" not in fragment
    assert r"\begin{align*}" in fragment


def test_notes_object_for_jupyter(bn_derivation):
    notes = make_notes(bn_derivation)
    assert isinstance(notes, Notes)
    assert notes._repr_markdown_() == notes.markdown
    # no text/latex: the LaTeX is a document, which a notebook's MathJax cannot show
    assert not hasattr(notes, "_repr_latex_")
    assert len(repr(notes)) < 200
    with pytest.raises(ValueError):
        render_notes(bn_derivation, fmt="html")
    with pytest.raises(ValueError):
        render_notes(bn_derivation, notation="bishop")


# -- real renderers ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=_rendered_first(EXAMPLES))
def example(request):
    return derive_network(load_spec(request.param))


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize("notation", ["d2l", "cs231n"])
def test_latex_compiles(example, notation, tmp_path):
    tex = render_notes(example, fmt="tex", notation=notation, steps=notation == "cs231n")
    ok, log, pdf = compile_latex(tex, tmp_path)
    assert ok, log[-3000:]
    assert pdf is not None
    assert overfull_boxes(log, min_pt=1.0) == []


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
def test_latex_fragment_compiles_inside_a_document(example, tmp_path):
    fragment = render_notes(example, fmt="tex", fragment=True)
    host = (
        "\\documentclass{article}\n\\usepackage{amsmath,amssymb,booktabs}\n"
        "\\begin{document}\n" + fragment + "\n\\end{document}\n"
    )
    ok, log, _ = compile_latex(host, tmp_path)
    assert ok, log[-3000:]


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize("notation", ["d2l", "cs231n"])
def test_markdown_math_parses_with_katex(example, notation):
    md = render_notes(example, fmt="md", notation=notation, steps=True)
    blocks = extract_markdown_math(md)
    assert len(blocks) > 10
    assert katex_errors(blocks) == []


# -- the Python API, the CLI flag, gradient flow, convolutions -------------------------------------
SIGMOID_SPEC = """
name = "sigmoid_net"
input = { features = 3 }
loss = "mse"

[[layers]]
type = "linear"
name = "fc1"
out = 3

[[layers]]
type = "sigmoid"
name = "s1"

[[layers]]
type = "linear"
name = "fc2"
out = 3

[[layers]]
type = "sigmoid"
name = "s2"
"""

CONV_SPEC = """
name = "small_conv"
input = { shape = [1, 6, 6] }
loss = "mse"

[[layers]]
type = "conv2d"
name = "conv1"
out_channels = 2
kernel = 3

[[layers]]
type = "maxpool2d"
name = "pool1"
kernel = 2

[[layers]]
type = "flatten"

[[layers]]
type = "linear"
name = "fc"
out = 3
"""


def test_symbp_notes_api(tmp_path):
    import symbp

    spec = tmp_path / "sigmoid_net.toml"
    spec.write_text(SIGMOID_SPEC, encoding="utf-8")
    from_path = symbp.notes(str(spec))
    from_net = symbp.notes(parse_spec(SIGMOID_SPEC), fmt="tex", notation="cs231n")
    assert isinstance(from_path, Notes)
    assert str(from_path) == from_path.markdown and str(from_path).startswith("# Backprop")
    assert str(from_net) == from_net.tex and r"\documentclass" in str(from_net)
    assert r"\mathrm{d}" in from_net.tex  # cs231n names
    assert from_path._repr_markdown_() == from_path.markdown
    assert "Gradient flow" not in from_path.markdown
    with pytest.raises(symbp.SpecError):
        symbp.notes(str(spec), fmt="html")
    with pytest.raises(symbp.SpecError):
        symbp.notes(str(spec), notation="bishop")


@pytest.fixture(scope="module")
def sigmoid_flow_notes():
    from symbp.flow import flow_bounds

    derivation = derive_network(parse_spec(SIGMOID_SPEC))
    rows = flow_bounds(derivation)
    return {fmt: render_notes(derivation, fmt=fmt, flow=rows) for fmt in ("md", "tex")}


def test_flow_section_shows_sigmoids_quarter(sigmoid_flow_notes):
    md = sigmoid_flow_notes["md"]
    section = md.split("## Gradient flow", 1)[1]
    # sup |sigmoid'| = 1/4 (at 0): the textbook bound, proved by sympy in symbp.flow
    assert section.count(r"\lVert J \rVert_2 \le \frac{1}{4}$") == 2
    assert "Same local Jacobian as layer 2." in section
    # two sigmoids between the output and the input: the product carries (1/4)^2 = 1/16
    assert r"\lVert W_{\mathrm{fc1}} \rVert_2 \lVert W_{\mathrm{fc2}} \rVert_2}{16}" in section


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
def test_flow_section_parses_with_katex(sigmoid_flow_notes):
    assert katex_errors(extract_markdown_math(sigmoid_flow_notes["md"])) == []


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
def test_flow_section_compiles(sigmoid_flow_notes, tmp_path):
    assert r"\section*{Gradient flow}" in sigmoid_flow_notes["tex"]
    ok, log, _ = compile_latex(sigmoid_flow_notes["tex"], tmp_path)
    assert ok, log[-3000:]
    assert overfull_boxes(log, min_pt=1.0) == []


def test_cli_latex_flow_flag(tmp_path, capsys):
    from symbp.cli import main

    spec = tmp_path / "sigmoid_net.toml"
    spec.write_text(SIGMOID_SPEC, encoding="utf-8")
    assert main(["latex", str(spec), "-o", "-", "--format", "md", "--flow"]) == 0
    assert "## Gradient flow" in capsys.readouterr().out
    assert main(["latex", str(spec), "-o", "-", "--format", "md"]) == 0
    assert "## Gradient flow" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def conv_derivation():
    return derive_network(parse_spec(CONV_SPEC))


@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_flow_section_of_a_conv_net_with_max_pooling(conv_derivation, fmt, tmp_path):
    """Max pooling routes dy to the arg-max: no Jacobian formula to read off, and the section
    says so instead of failing (it raised a TypeError)."""
    from symbp.flow import flow_bounds

    notes = render_notes(conv_derivation, fmt=fmt, flow=flow_bounds(conv_derivation))
    assert "Its local Jacobian is not read off the derived VJP" in notes
    if fmt == "md" and have_node():
        assert katex_errors(extract_markdown_math(notes)) == []
    if fmt == "tex" and have_pdflatex():
        ok, log, _ = compile_latex(notes, tmp_path)
        assert ok, log[-3000:]


def test_conv_notes_say_full_convolution_with_flipped_kernel(conv_derivation):
    md = render_notes(conv_derivation, fmt="md")
    conv = md.split("### Layer 1:", 1)[1].split("### Layer 2:", 1)[0]
    assert "*full convolution*" in conv and "*flipped* kernel" in conv
    # stride 1: dx[n, c, h, w] = sum_{o, p, q} W[o, c, h - p, w - q] dy[n, o, p, q], the
    # textbook input gradient of a convolution (kernel index = input position - output position)
    assert r"W_{o',c,h - p',w - q'} \frac{\partial J}{\partial y_{n,o',p',q'}}" in conv
    # max pooling (stride 2) is a scatter to the window's arg-max, not a convolution
    pool = md.split("### Layer 2:", 1)[1].split("### Layer 3:", 1)[0]
    assert "full convolution" not in pool and r"\operatorname{argmax}_{k,k'}" in pool
    # the network's forward pass keeps index form for the windowed layers
    assert r"h^{(1)}_{nopq} &= \sum_{c,i,j} W^{(1)}_{ocij}" in md


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
def test_conv_notes_parse_with_katex(conv_derivation):
    md = render_notes(conv_derivation, fmt="md", notation="cs231n")
    assert katex_errors(extract_markdown_math(md)) == []


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
def test_conv_notes_compile(conv_derivation, tmp_path):
    ok, log, _ = compile_latex(render_notes(conv_derivation, fmt="tex"), tmp_path)
    assert ok, log[-3000:]
    assert overfull_boxes(log, min_pt=1.0) == []


# -- user activations with real powers -----------------------------------------------------------
# derive, codegen and check took these; the notes raised TypeError (a network-level node handed
# an exponent by sympy's _print_Pow) or RecursionError (a negative rational power of an array).
REAL_POWERS = [
    "x**x",
    "x**1.5",
    "x*sqrt(x)",
    "x**(2/3)",
    "x**e",
    "x**pi",
    "x**sin(x)",
    "x**2**0.5",
    "x**(1/3)",
    "x**-0.5",
]

POWER_SPEC = """
name = "pw"
input = {{ features = 3 }}
loss = "mse"

[[layers]]
type = "activation"
expr = "{expr}"

[[layers]]
type = "linear"
out = 2
"""


@pytest.fixture(scope="module", params=[
    # three in the default run: a power of x, an irrational exponent, x to a function of x
    pytest.param(text, marks=() if text in ("x**1.5", "x**pi", "x**sin(x)") else pytest.mark.slow)
    for text in REAL_POWERS
])
def real_power_notes(request):
    from symbp.flow import flow_bounds

    derivation = derive_network(parse_spec(POWER_SPEC.format(expr=request.param)))
    rows = flow_bounds(derivation)
    notes = {
        (fmt, notation): render_notes(derivation, fmt=fmt, notation=notation, steps=True, flow=rows)
        for fmt in ("md", "tex")
        for notation in ("d2l", "cs231n")
    }
    return request.param, notes


def test_real_power_activation_exports(real_power_notes):
    from symbp.declare.expr import parse_expression

    text, notes = real_power_notes
    f = parse_expression(text, variable=sp.Symbol("x", real=True))
    # the activation in the variable x, as sympy's own LaTeX printer writes it
    row = r"f{\left(x \right)} &= " + sp.latex(f)
    for doc in notes.values():
        assert row in doc
        assert "## Gradient flow" in doc or r"\section*{Gradient flow}" in doc


@pytest.mark.parametrize(
    ("text", "forward", "index"),
    [
        (
            "x**1.5",
            r"\mathbf{h}^{(1)} &= \left(\mathbf{h}^{(0)}\right)^{\odot \frac{3}{2}}",
            r"y_{nj} &= x^{\frac{3}{2}}_{nj}",
        ),
        (
            "x**(1/3)",
            r"\mathbf{h}^{(1)} &= \sqrt[3]{\mathbf{h}^{(0)}}",
            r"y_{nj} &= \sqrt[3]{x_{nj}}",
        ),
        (
            "x**-0.5",
            r"\mathbf{h}^{(1)} &= \frac{1}{\sqrt{\mathbf{h}^{(0)}}}",
            r"y_{nj} &= \frac{1}{\sqrt{x_{nj}}}",
        ),
        (
            "x**x",
            r"\mathbf{h}^{(1)} &= \left(\mathbf{h}^{(0)}\right)^{\odot \mathbf{h}^{(0)}}",
            r"y_{nj} &= x^{x_{nj}}_{nj}",
        ),
    ],
)
def test_real_power_activation_forms(text, forward, index):
    md = render_notes(derive_network(parse_spec(POWER_SPEC.format(expr=text))), fmt="md")
    assert forward in md  # the network's forward pass, whole-array form
    assert index in md  # the layer's definition, index form
    if text == "x**-0.5":  # d/dx x^(-1/2) = -1 / (2 x^(3/2))
        assert r"\frac{\partial J}{\partial x_{nj}} &= - \frac{1}{2 x^{\frac{3}{2}}_{nj}}" in md


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
def test_real_power_notes_parse_with_katex(real_power_notes):
    _, notes = real_power_notes
    for notation in ("d2l", "cs231n"):
        assert katex_errors(extract_markdown_math(notes["md", notation])) == []


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
def test_real_power_notes_compile(real_power_notes, tmp_path):
    _, notes = real_power_notes
    for notation in ("d2l", "cs231n"):
        ok, log, _ = compile_latex(notes["tex", notation], tmp_path / notation)
        assert ok, log[-3000:]
        assert overfull_boxes(log, min_pt=1.0) == []


@pytest.mark.parametrize("suffix", [".md", ".tex"])
def test_cli_latex_real_power_activation(tmp_path, suffix):
    import symbp
    from symbp.cli import main

    spec = tmp_path / "pw.toml"
    spec.write_text(POWER_SPEC.format(expr="x*sqrt(x)"), encoding="utf-8")
    out = tmp_path / f"pw{suffix}"
    assert main(["latex", str(spec), "-o", str(out), "--steps", "--flow"]) == 0
    assert r"x^{\frac{3}{2}}_{nj}" in out.read_text(encoding="utf-8")
    net = symbp.Net([symbp.activation("x**(1/3)"), symbp.linear(2)], input_features=3, loss="mse")
    assert r"\sqrt[3]{x_{nj}}" in str(symbp.notes(net, fmt=suffix[1:], notation="cs231n"))


# -- activation derivatives: each printed f' is the derivative of the printed f ------------------
ALL_ELEMENTWISE_SPEC = """
name = "every_activation"
input = { features = 3 }
loss = "mse"
layers = [
  { type = "sigmoid" }, { type = "tanh" }, { type = "relu" }, { type = "softplus" },
  { type = "silu" }, { type = "gelu" }, { type = "leaky_relu", slope = 0.2 },
  { type = "prelu", name = "shared" }, { type = "prelu", name = "per_feature", shared = false },
  { type = "rrelu" }, { type = "elu", alpha = 0.5 },
  { type = "activation", name = "kinked", expr = "max(x, 0.3*x) + abs(x)/2" },
]
"""


def _activation_layers(examples: bool):
    """The activations of the examples (``examples``) or of the spec with every built-in kind."""
    from symbp.declare.layers import Elementwise

    if examples:
        specs = [(p.stem, load_spec(p)) for p in EXAMPLES]
    else:
        specs = [("every_activation", parse_spec(ALL_ELEMENTWISE_SPEC))]
    for stem, net in specs:
        derivation = derive_network(net)
        seen = set()
        for derived in derivation.layers:
            if isinstance(derived.layer, Elementwise) and id(derived.derivation) not in seen:
                seen.add(id(derived.derivation))
                yield stem, derivation, derived


@pytest.mark.parametrize("examples", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["every_kind", "examples"])
def test_printed_activation_derivatives_are_the_derivative_of_the_printed_function(examples):
    """For every built-in kind (and every activation of every example), each ``f'`` row the
    notes print equals sympy's own ``diff`` of the printed ``f``, at points away from the kinks,
    with ``y = f(x)`` where a row reads the output and sample values for parameters (prelu's
    alpha) and constants. prelu's notes once printed the gradient of alpha as ``f'``."""
    from symbp.emit.latex_printer import NotesLatexPrinter
    from symbp.emit.notes_math import X_SCALAR, Y_SCALAR, activation_formulas

    checked, docs = set(), {}
    points = (-2.3, -0.7, -0.15, 0.2, 0.9, 3.1)
    for stem, network, derived in _activation_layers(examples):
        formulas = activation_formulas(derived.derivation)
        form = derived.derivation.form
        values = {s: v for s, v in form.constants.items()}
        for array in form.params + form.aux:
            values[sp.Symbol(array.name, real=True)] = sp.Rational(3, 7)
        f = formulas.f.xreplace(values)
        expected = sp.diff(f, X_SCALAR)  # sympy, independently of the engine
        assert formulas.derivatives, (stem, derived.name)
        for printed in formulas.derivatives:
            fprime = printed.xreplace(values).xreplace({Y_SCALAR: f})
            assert fprime.free_symbols <= {X_SCALAR}, (stem, derived.name, printed)
            for point in points:
                got = complex(fprime.subs(X_SCALAR, point).evalf())
                want = complex(expected.subs(X_SCALAR, point).evalf())
                assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (
                    stem, derived.name, point, printed, got, want,
                )
        # and these are the rows the notes print (one rendering per network)
        if stem not in docs:
            docs[stem] = render_notes(network, fmt="md")
        doc = docs[stem]
        printer = NotesLatexPrinter({"arrays": set()})
        fx = sp.Function("f")(X_SCALAR)
        for printed in formulas.derivatives:
            assert printer.rows([(sp.Derivative(fx, X_SCALAR), printed)]) in doc
        assert printer.rows([(fx, formulas.f)]) in doc
        checked.add(derived.layer.kind)
    if not examples:
        assert {"prelu", "rrelu", "leaky_relu", "elu", "activation", "sigmoid"} <= checked
    assert checked


# -- the notes' proof of a padded convolution: small, and still refutes wrong formulas -----------
PADDED_CONV_SPEC = """
name = "padded"
input = { shape = [2, 5, 5] }
loss = "mse"
layers = [
  { type = "conv2d", name = "conv", out_channels = 2, kernel = 3, padding = 1 },
  { type = "flatten" },
]
"""


@pytest.fixture(scope="module")
def padded_conv():
    return derive_network(parse_spec(PADDED_CONV_SPEC)).layer("conv").derivation


def test_padded_proof_keeps_the_default_padded_input_size(padded_conv):
    """The notes prove a padded layer on an image 2P smaller than the verifier's default, so
    the padded input has the default size (the cost of scalar expansion grows with its square:
    symbp latex of a padded net took 19 s)."""
    from symbp.derivation.verify import default_sizes
    from symbp.emit.notes import proof_sizes

    default = {s.name: v for s, v in default_sizes(padded_conv.form, batch=2).items()}
    sizes = {s.name: v for s, v in proof_sizes(padded_conv, 2).items()}
    P = sizes["padding"]
    assert P >= 1
    for dim in ("H", "W"):
        assert sizes[f"{dim}_in"] + 2 * P == default[f"{dim}_in"]
        # every output reads the padding on one side or the other, and some read only input
        assert sizes[f"{dim}_out"] == sizes[f"{dim}_in"] + 2 * P - sizes[f"K_{dim[0].lower()}"] + 1
        assert sizes[f"{dim}_out"] >= 3


@pytest.mark.parametrize("mutant", ["kernel_not_flipped", pytest.param(
    "padding_one_side", marks=pytest.mark.slow), "border_dropped"])
def test_padded_proof_refutes_wrong_input_gradients(padded_conv, mutant):
    """Wrong input gradients of a padded convolution are refuted at the notes' proof sizes."""
    import dataclasses

    from symbp.derivation.verify import verify_layer
    from symbp.emit.notes import proof_sizes

    adjoint = padded_conv.vjp["x"]
    expr = adjoint.expr
    (kernel,) = [e for e in expr.atoms(sp.Indexed) if e.base.name == "W"]
    padding = next(s for s in padded_conv.form.constants if s.name == "padding")
    if mutant == "kernel_not_flipped":
        o, c, k, k2 = kernel.indices
        K_h, K_w = (next(s for s in expr.free_symbols if s.name == n) for n in ("K_h", "K_w"))
        expr = expr.xreplace({kernel: kernel.base[o, c, K_h - 1 - k, K_w - 1 - k2]})
    elif mutant == "padding_one_side":
        h = adjoint.indices[2]
        expr = expr.xreplace({h + padding: h})
    else:
        variable, low, high = expr.limits[0]
        expr = sp.Sum(expr.function, (variable, low + 1, high), *expr.limits[1:])
    assert expr != adjoint.expr
    wrong = dataclasses.replace(
        padded_conv, vjp={**padded_conv.vjp, "x": dataclasses.replace(adjoint, expr=expr)}
    )
    verdicts = verify_layer(wrong, proof_sizes(wrong, 2))
    by_name = {v.name: v.proven for v in verdicts}
    assert by_name == {"dx": False, "dW": True, "db": True}


# -- typesetting: names, constants, notation ---------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "settings", "expected"),
    [
        # several letters are one name, set upright; one letter stays italic
        (sp.Symbol("H_in"), {}, r"H_{\mathrm{in}}"),
        (sp.Symbol("K_h"), {}, r"K_{h}"),
        (sp.IndexedBase("xp")[n, j], {"arrays": {"xp"}}, r"\mathrm{xp}_{nj}"),
        (sp.Symbol("xp"), {"arrays": {"xp"}, "whole": True}, r"\mathbf{xp}"),
        # a word before the letter it multiplies, with a thin space: not "pstride"
        (sp.Symbol("p") * sp.Symbol("stride") + sp.Symbol("i"), {}, r"\mathrm{stride}\, p + i"),
        # constants as people write them
        (sp.Rational(1, 100000), {}, "10^{-5}"),
        (sp.Rational(1, 1000), {}, "0.001"),
        (sp.Rational(1, 10), {}, "0.1"),
        (sp.Rational(3, 10) * sp.Symbol("x"), {}, "0.3 x"),
        (sp.Rational(0.3333333333333333), {}, r"\frac{1}{3}"),  # the float nearest 1/3
        (sp.Rational(1, 8), {}, r"\frac{1}{8}"),
        (sp.Rational(1, 4), {}, r"\frac{1}{4}"),
        # cs231n: the code's name where d\sigma^2 would read as a power of a differential
        (
            sp.IndexedBase("dvar")[j],
            {"arrays": {"var"}, "notation": "cs231n"},
            r"\mathrm{dvar}_{j}",
        ),
        (
            sp.IndexedBase("dinvstd")[j],
            {"arrays": {"invstd"}, "notation": "cs231n"},
            r"\mathrm{dinvstd}_{j}",
        ),
        (sp.IndexedBase("dxhat")[n, j], {"arrays": {"xhat"}, "notation": "cs231n"},
         r"\mathrm{d}\hat{x}_{nj}"),
        (
            sp.IndexedBase("dvar")[j],
            {"arrays": {"var"}},
            r"\frac{\partial J}{\partial \sigma^{2}_{j}}",
        ),
    ],
)
def test_printer_typesetting(expr, settings, expected):
    assert latex(expr, **settings) == expected


@pytest.fixture(scope="module")
def cnn_bn_notes():
    derivation = derive_network(load_spec(Path(__file__).resolve().parent.parent
                                          / "examples" / "cnn_bn.toml"))
    return {
        notation: render_notes(derivation, fmt="md", notation=notation)
        for notation in ("d2l", "cs231n")
    }


def test_no_numpy_spellings_or_italic_words_in_image_notes(cnn_bn_notes):
    for doc in cnn_bn_notes.values():
        assert r"\operatorname{sum}_{(" not in doc  # NumPy's axes, not mathematics
        assert "NewAxis" not in doc
        assert "H_{in}" not in doc and "W_{in}" not in doc and " xp_" not in doc
        assert r"p \mathrm{stride}" not in doc
        assert r"\epsilon = 10^{-5}" in doc
        # batch norm on images: the per-channel mean written as a sum over the batch and pixels
        mean = r"\mu^{(2)}_{c} &= \frac{1}{H_{\mathrm{in}} N W_{\mathrm{in}}} "
        assert mean + r"\sum_{m,r,s} h^{(1)}_{mcrs}" in doc
    assert r"\mathrm{d}\sigma" not in cnn_bn_notes["cs231n"]
    assert r"\mathrm{dvar}_{c}" in cnn_bn_notes["cs231n"]


RESIDUAL_SPEC = """
name = "res"
input = { features = 3 }
loss = "mse"

[[layers]]
type = "linear"
out = 3

[[layers]]
type = "residual"
name = "block"
layers = [ { type = "linear", out = 3 }, { type = "tanh" } ]
"""


def test_residual_block_input_is_explained_not_a_dangling_layer():
    doc = render_notes(derive_network(parse_spec(RESIDUAL_SPEC)), fmt="md")
    assert r"\mathbf{h}^{(2.0)}" not in doc  # the body reads the block's input h^{(1)}
    assert r"\mathbf{h}^{(2.1)} &= \mathbf{h}^{(1)} \mathbf{W}^{(2.1)} + \mathbf{b}^{(2.1)}" in doc
    skip = r"\boldsymbol{\delta}^{(1)} &= \boldsymbol{\delta}^{(2.0)} + \boldsymbol{\delta}^{(2)}"
    assert skip in doc
    assert r"$\boldsymbol{\delta}^{(l.0)}$ is the part of the gradient at the block's" in doc


def test_rrelu_largest_derivative_uses_the_range_of_its_slope():
    """f' is 1 or r with r in [lower, upper] = [1/8, 1/3]: the largest value is 1, not max(1, r)."""
    spec = 'name = "r"\ninput = { features = 2 }\nloss = "mse"\nlayers = [ { type = "rrelu" } ]\n'
    doc = render_notes(derive_network(parse_spec(spec)), fmt="md")
    assert r"The largest value of the derivative is $1$." in doc
    assert r"r \in \left[\mathrm{lower}, \mathrm{upper}\right]" in doc
    assert r"\mathrm{upper} = \frac{1}{3}" in doc


# -- numbering only the layers with parameters ---------------------------------------------------
D2L_MLP = """
name = "d2l_mlp"
input = { features = 4 }
loss = "mse"
layers = [
  { type = "linear", name = "hidden", out = 5 },
  { type = "relu" },
  { type = "linear", name = "output", out = 2 },
]
"""


def test_numbering_params_numbers_the_weight_layers():
    """d2l writes the second linear layer's weights W^{(2)}; numbering every layer: W^{(3)}."""
    derivation = derive_network(parse_spec(D2L_MLP))
    every = render_notes(derivation, fmt="md")
    assert r"\mathbf{W}^{(3)}" in every
    doc = render_notes(derivation, fmt="md", numbering="params")
    assert r"\mathbf{W}^{(3)}" not in doc
    assert r"\mathbf{h}^{(2)} &= \mathbf{h}^{(1')} \mathbf{W}^{(2)} + \mathbf{b}^{(2)}" in doc
    assert r"\mathbf{h}^{(1')} &= \max\left(0, \mathbf{h}^{(1)}\right)" in doc
    assert "| 1' | `relu2` (relu)" in doc
    assert "Only the layers with parameters are numbered" in doc
    tex = render_notes(derivation, fmt="tex", numbering="params")
    assert r"\mathbf{W}^{(2)}" in tex and r"\mathbf{W}^{(3)}" not in tex
    with pytest.raises(ValueError):
        render_notes(derivation, numbering="weights")


def test_numbering_params_from_python_and_the_command_line(tmp_path):
    import symbp
    from symbp.cli import main

    net = parse_spec(D2L_MLP)
    notes = symbp.notes(net, numbering="params")
    assert r"\mathbf{W}^{(2)} \in" in notes.markdown and r"\mathbf{W}^{(3)}" not in notes.markdown
    with pytest.raises(symbp.SpecError):
        symbp.notes(net, numbering="weights")
    spec = tmp_path / "mlp.toml"
    spec.write_text(D2L_MLP, encoding="utf-8")
    out = tmp_path / "notes.md"
    assert main(["latex", str(spec), "-o", str(out), "--numbering", "params"]) == 0
    text = out.read_text(encoding="utf-8")
    assert r"\mathbf{W}^{(2)}" in text and r"\mathbf{W}^{(3)}" not in text


@pytest.mark.parametrize("example", _rendered_first(EXAMPLES))
def test_numbering_params_parses_with_katex(example):
    if not have_node():
        pytest.skip("node missing: .ci/install_render_tools.sh")
    doc = render_notes(derive_network(load_spec(example)), fmt="md", numbering="params")
    errors = katex_errors(extract_markdown_math(doc))
    assert errors == [], errors[:3]


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize("spec", ["residual_mlp.toml", "cnn_bn.toml"])
def test_numbering_params_compiles(spec, tmp_path):
    path = Path(__file__).resolve().parent.parent / "examples" / spec
    tex = render_notes(derive_network(load_spec(path)), fmt="tex", numbering="params")
    ok, log, pdf = compile_latex(tex, tmp_path)
    assert ok, log[-3000:]
    assert overfull_boxes(log, min_pt=1.0) == []


def test_notes_show_each_layers_own_constants_after_another_net_shared_the_derivation():
    """Derivations are cached by a layer's math across networks; the notes of a dropout with
    p = 0.3 must say 0.3 even when a dropout with p = 0.2 was derived first (CI's gallery
    test showed the earlier net's p)."""
    import symbp
    from symbp.declare.net import Net

    def net(p):
        return Net([symbp.dropout(p=p), symbp.linear(2)], input_features=3, loss="mse")

    first = symbp.notes(net(0.2)).markdown
    page = symbp.notes(net(0.3)).markdown
    assert "p = \\frac{1}{5}" in first  # the first net's own p = 0.2, exact
    assert "p = \\frac{1}{5}" not in page and "$p = 0.3$" in page
