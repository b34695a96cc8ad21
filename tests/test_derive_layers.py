"""Every layer type's derived backward pass, against truths the engine does not produce itself.

The main table runs over every registered layer type (losses and the residual add included) and
proves each derived formula -- the staged chain rule and the compact form -- equal to direct
scalar differentiation at small concrete sizes (:func:`symbp.derivation.verify.verify_layer`: every
array element its own symbol, every sum written out, ``diff`` applied element by element).

The facts below it are the textbook results, written out here by hand with sympy and compared
with what the engine derived: batch norm's compact closed form, sigmoid's ``y*(1-y)``, tanh's
``1-y**2``, softmax cross-entropy's ``(softmax - Y)/N``, linear's ``dz @ W.T``, PyTorch's
derivative conventions at kinks, and a user expression deriving exactly like the built-in it
spells out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import sympy as sp

import symbp
from symbp import cli
from symbp.declare import canon, conv, graph, layers
from symbp.declare.forms import N
from symbp.declare.layers import BatchNorm
from symbp.derivation.arrays import Lowering
from symbp.derivation.keep import _peels
from symbp.derivation.layer import Adjoint, LayerDerivation, derive_layer
from symbp.derivation.verify import default_sizes, expand_forward, is_zero, verify_layer
from symbp.emit.numpy_printer import numpy_code

MISH = "x*tanh(log(1 + exp(x)))"

# Index symbols and arrays, built here rather than taken from the engine.
n, i, j, m, c, k = (sp.Symbol(name, integer=True) for name in "nijmck")
C = sp.Symbol("C", integer=True, positive=True)
F = sp.Symbol("F", integer=True, positive=True)


def array(name: str, **assumptions) -> sp.IndexedBase:
    return sp.IndexedBase(name, real=True, **assumptions)


x, y, dy = array("x"), array("y"), array("dy")


# -- the table: every layer type, proven by scalar expansion ----------------------------------
Sizes = tuple[tuple[int, int], ...]  # (batch N, width) pairs handed to default_sizes
SMALL: Sizes = ((2, 2), (3, 3), (4, 2))
TWO_WIDTHS: Sizes = ((2, 2), (3, 2), (4, 2))  # linear: widths (I, O) = (2, 3) at width 2


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # the registered type this row covers
    make: object  # () -> Layer
    compact: Sizes = SMALL
    staged: Sizes = SMALL
    mode: str = "train"  # or "eval": the evaluation-mode forward
    shape: tuple = (3,)  # the per-sample input shape (a layer reading several: their tuple)


CASES = [
    Case("linear", "linear", lambda: layers.Linear(3), TWO_WIDTHS, TWO_WIDTHS),
    Case("linear_nobias", "linear", lambda: layers.Linear(3, bias=False), TWO_WIDTHS, TWO_WIDTHS),
    # Batch norm couples the whole batch; the staged chain at N=4 alone takes ~15 s.
    Case("batchnorm", "batchnorm", layers.BatchNorm, SMALL, ((2, 2), (3, 2))),
    Case("batchnorm_eval", "batchnorm", layers.BatchNorm, mode="eval"),
    Case("sigmoid", "sigmoid", layers.Sigmoid),
    Case("tanh", "tanh", layers.Tanh),
    Case("relu", "relu", layers.Relu),
    Case("leaky_relu", "leaky_relu", lambda: layers.LeakyRelu(0.2)),
    # One shared slope: dalpha has a kink in every element (3**elements branches).
    Case("prelu_shared", "prelu", layers.Prelu, ((2, 2), (3, 2)), ((2, 2),)),
    Case("prelu_per_feature", "prelu", lambda: layers.Prelu(shared=False)),
    Case("rrelu", "rrelu", layers.Rrelu),
    Case("rrelu_eval", "rrelu", layers.Rrelu, mode="eval"),
    Case("elu", "elu", layers.Elu),
    Case("softplus", "softplus", layers.Softplus),
    Case("silu", "silu", layers.Silu),
    Case("gelu", "gelu", layers.Gelu),
    Case("activation_mish", "activation", lambda: layers.Activation(MISH)),
    Case("activation_swish", "activation", lambda: layers.Activation("x/(1 + exp(-1.5*x))")),
    Case("activation_kinked", "activation", lambda: layers.Activation("max(0, x) + 0.1*min(0, x)")),
    Case("activation_abs", "activation", lambda: layers.Activation("abs(x)")),
    Case("activation_misc", "activation", lambda: layers.Activation("asinh(x)*atan(x)")),
    Case("residual_add", "residual", lambda: layers.Residual([layers.Linear(3)])),
    # A layer declared by its stages (symbp.layer): layer norm, over the features.
    Case("custom_layernorm", "custom", lambda: symbp.layer(
        ["mu[n] = mean(x[n, j], j)", "var[n] = mean((x[n, j] - mu[n])**2, j)",
         "y[n, j] = gamma[j] * (x[n, j] - mu[n]) / sqrt(var[n] + eps) + beta[j]"],
        params={"gamma": "D", "beta": "D"}, constants={"eps": 1e-5},
    ), SMALL, ((2, 2), (3, 2))),
    Case("layer_norm", "layer_norm", canon.LayerNorm, SMALL, ((2, 2), (3, 2))),
    Case("softmax", "softmax", canon.Softmax),
    Case("log_softmax", "log_softmax", canon.LogSoftmax),
    Case("dropout", "dropout", lambda: canon.Dropout(0.3)),
    Case("dropout_eval", "dropout", lambda: canon.Dropout(0.3), mode="eval"),
    # The layers that read several values (a graph's), and a split's part.
    Case("add", "add", graph.Addition, shape=((3,), (3,))),
    Case("multiply", "multiply", graph.Multiplication, shape=((3,), (3,))),
    Case("concat", "concat", graph.Concat, shape=((3,), (2,))),
    Case("concat3", "concat", graph.Concat, shape=((2,), (3,), (2,))),
    Case("split_part", "split", lambda: graph.Slice(1, 2)),
    Case("matmul", "matmul", graph.Matmul, shape=((2, 3), (3, 2))),
    Case("mse", "mse", layers.Mse),
    Case("softmax_cross_entropy", "softmax_cross_entropy", layers.SoftmaxCrossEntropy),
    Case("bce_with_logits", "bce_with_logits", layers.BceWithLogits),
]
BY_ID = {case.id: case for case in CASES}


@cache
def derivation_of(case_id: str) -> LayerDerivation:
    case = BY_ID[case_id]
    layer = case.make()
    form = (layer.forward_form(case.shape) if case.mode == "train"
            else layer.eval_form(case.shape))
    return derive_layer(form)


def _verify_params():
    """Every case, compact and staged; the first sizes of each in the default run, the other
    sizes with -m slow (CI)."""
    for case in CASES:
        for which, schedule in (("compact", case.compact), ("staged", case.staged)):
            for position, (batch, width) in enumerate(schedule):
                yield pytest.param(
                    case.id, batch, width, which == "staged",
                    id=f"{case.id}-{which}-N{batch}-w{width}",
                    marks=pytest.mark.slow if position else (),
                )


#: The layer types of :mod:`symbp.declare.layers` (dense layers, activations, residual, losses);
#: image layers (:mod:`symbp.declare.conv`) are covered by their own table.
#: (global_avgpool and group_norm, which take images, are proven in tests/test_canon.py,
#: conv_transpose2d in tests/test_conv_transpose.py; embedding, on ids: tests/test_embedding.py;
#: attention, on sequences: tests/test_attention.py)
DENSE_KINDS = {kind for kind, cls in layers.REGISTRY.items()
               if cls.__module__ != conv.__name__
               and kind not in ("global_avgpool", "group_norm", "conv_transpose2d", "embedding",
                                "attention", "rnn", "lstm")}
# (rnn, lstm: derived as their cells' parts, tests/test_rnn.py, tests/test_lstm_layer.py)


def test_table_covers_every_registered_dense_layer_type():
    assert DENSE_KINDS == {case.kind for case in CASES}


@pytest.mark.parametrize(("case_id", "batch", "width", "staged"), list(_verify_params()))
def test_derivation_equals_direct_scalar_differentiation(case_id, batch, width, staged):
    derivation = derivation_of(case_id)
    sizes = default_sizes(derivation.form, batch=batch, width=width)
    verdicts = verify_layer(derivation, sizes, staged=staged)
    assert {v.name for v in verdicts} == {"d" + a.name for a in derivation.form.differentiable}
    failed = [(v.name, v.detail) for v in verdicts if not v.proven]
    assert not failed, f"{case_id} at {sizes}: {failed}"


# -- the check has teeth: wrong formulas are refuted -------------------------------------------
def _tampered(derivation: LayerDerivation, name: str, expr: sp.Expr) -> LayerDerivation:
    old = derivation.vjp[name]
    vjp = dict(derivation.vjp)
    vjp[name] = Adjoint(old.array, old.indices, expr)
    return dataclasses.replace(derivation, vjp=vjp)


def _batchnorm_without_sum_dy() -> sp.Expr:
    gamma, invstd, xhat = array("gamma"), array("invstd", positive=True), array("xhat")
    total = sp.Sum(dy[m, j] * xhat[m, j], (m, 0, N - 1))
    return gamma[j] * invstd[j] / N * (N * dy[n, j] - xhat[n, j] * total)


@pytest.mark.parametrize(
    ("case_id", "name", "wrong"),
    [
        ("sigmoid", "x", lambda: dy[n, j] * y[n, j]),
        ("tanh", "x", lambda: dy[n, j] * (1 + y[n, j] ** 2)),
        # ReLU'(0) = 1/2, sympy's Heaviside default, must not pass for the 0 convention.
        ("relu", "x", lambda: dy[n, j] * sp.Heaviside(y[n, j], sp.Rational(1, 2))),
        ("batchnorm", "x", _batchnorm_without_sum_dy),
        # An off-by-one over the batch: the last sample left out.
        ("linear", "W", lambda: sp.Sum(x[m, i] * array("dz")[m, j], (m, 0, N - 2))),
    ],
)
def test_scalar_expansion_refutes_a_wrong_formula(case_id, name, wrong):
    derivation = _tampered(derivation_of(case_id), name, wrong())
    sizes = default_sizes(derivation.form, batch=2)
    verdicts = {v.name: v for v in verify_layer(derivation, sizes)}
    assert not verdicts["d" + name].proven


# -- batch norm: the compact closed form -------------------------------------------------------
def batchnorm_closed_form() -> sp.Expr:
    """``gamma*invstd/N * (N*dy - Sum_m dy - xhat * Sum_m dy*xhat)``, written out by hand."""
    gamma, invstd, xhat = array("gamma"), array("invstd", positive=True), array("xhat")
    sum_dy = sp.Sum(dy[m, j], (m, 0, N - 1))
    sum_dy_xhat = sp.Sum(dy[m, j] * xhat[m, j], (m, 0, N - 1))
    return gamma[j] * invstd[j] / N * (N * dy[n, j] - sum_dy - xhat[n, j] * sum_dy_xhat)


def test_batchnorm_compact_dx_is_the_closed_form_for_symbolic_n():
    derived = derivation_of("batchnorm").vjp["x"]
    assert derived.indices == (n, j)
    assert sp.expand(derived.expr - batchnorm_closed_form()) == 0


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_batchnorm_closed_form_equals_engine_and_direct_differentiation(batch):
    """At concrete N the hand-written closed form, the engine's dx and ``diff`` all agree."""
    derivation = derivation_of("batchnorm")
    sizes = {N: batch, F: 2}
    expanded = expand_forward(derivation.form, sizes)
    outputs = expanded.tables["y"]
    contraction = sp.Add(*[expanded.tables["dy"][p] * outputs[p] for p in outputs])
    closed, derived = batchnorm_closed_form(), derivation.vjp["x"].expr
    for position, element in expanded.tables["x"].items():
        binding = dict(zip((n, j), position, strict=True))
        by_hand = expanded.expand(closed, binding)
        assert is_zero(by_hand - expanded.expand(derived, binding))
        assert is_zero(by_hand - sp.diff(contraction, element))


def test_batchnorm_backward_reads_only_named_intermediates():
    """The compact form needs xhat and invstd (and gamma), not x, mu or var."""
    derivation = derivation_of("batchnorm")
    assert set(derivation.stored) == {"gamma", "xhat", "invstd"}
    xhat = array("xhat")
    assert derivation.vjp["gamma"].expr == sp.Sum(dy[m, j] * xhat[m, j], (m, 0, N - 1))
    assert derivation.vjp["beta"].expr == sp.Sum(dy[m, j], (m, 0, N - 1))


def test_batchnorm_proves_that_xhat_sums_to_zero_over_the_batch():
    identities = {rule.lhs: rule.rhs for rule in derivation_of("batchnorm").identities}
    assert identities[sp.Sum(array("xhat")[m, j], (m, 0, N - 1))] == 0


# -- element-wise layers in terms of the stored output ----------------------------------------
@pytest.mark.parametrize(
    ("case_id", "expected"),
    [
        ("sigmoid", lambda: dy[n, j] * y[n, j] * (1 - y[n, j])),
        ("tanh", lambda: dy[n, j] * (1 - y[n, j] ** 2)),
    ],
)
def test_derivative_in_terms_of_the_stored_output(case_id, expected):
    derivation = derivation_of(case_id)
    assert derivation.stored == ("y",)
    assert sp.expand(derivation.vjp["x"].expr - expected()) == 0


def test_an_output_that_does_not_tell_the_input_sign_is_not_what_backward_reads():
    """y = x - max(x, 0) = min(x, 0): solving for x gives x = y only for x <= 0, and the
    derivative 1 - step(x) is not a function of y. ReLU's output does tell: step(x) =
    step(max(x, 0))."""
    derivation = derive_layer(layers.Activation("x - max(x, 0)").forward_form((3,)))
    assert derivation.stored == ("x",)
    expected = dy[n, j] * (1 - sp.Heaviside(x[n, j], 0))
    for value in (-1.5, -0.25, 0.5, 2.0):
        at = {x[n, j]: value, dy[n, j]: 1}
        assert derivation.vjp["x"].expr.xreplace(at) == expected.xreplace(at)
    assert derivation_of("relu").stored == ("y",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("exp(x)/(1 + exp(x))", lambda: dy[n, j] * y[n, j] * (1 - y[n, j])),
     ("2/(1 + exp(-2*x)) - 1", lambda: dy[n, j] * (1 - y[n, j] ** 2))],
    ids=["sigmoid", "tanh"],
)
def test_a_user_sigmoid_or_tanh_gets_the_polynomial_in_its_output(text, expected):
    """Rewritten in y, their VJPs came out as sums of fractions with y - 1 (or y + 1) below:
    0/0, NaN, once y rounds to 1 (x = 20 in float64). Cancelled, they are the textbook forms."""
    derivation = derive_layer(layers.Activation(text).forward_form((3,)))
    assert derivation.stored == ("y",)
    assert sp.fraction(sp.together(derivation.vjp["x"].expr))[1] == 1
    assert sp.expand(derivation.vjp["x"].expr - expected()) == 0


def test_an_output_read_through_an_inverse_function_is_not_kept():
    """tanh(tanh(x)) in its output needs atanh(y): inaccurate where y saturates."""
    derivation = derive_layer(layers.Activation("tanh(tanh(x))").forward_form((3,)))
    assert derivation.stored == ("x",)
    assert not derivation.vjp["x"].expr.has(sp.atanh)


@pytest.mark.parametrize(
    ("text", "rate"), [("exp(400*x)", 400), ("exp(1000*x)", 1000), ("exp(x)**400", 400)]
)
def test_an_output_past_the_float64_range_at_a_sample_point_is_still_kept(text, rate):
    """exp(400*x) at the sample point x = 6.93 is about 1e1206: compared as Python complex
    numbers, inf - inf raised OverflowError and the derivation failed."""
    derivation = derive_layer(layers.Activation(text).forward_form((3,)))
    assert derivation.stored == ("y",)
    assert sp.expand(derivation.vjp["x"].expr - rate * dy[n, j] * y[n, j]) == 0


def test_a_steep_exponential_that_reads_its_output_passes_the_gradient_check():
    net = symbp.Net(
        [symbp.linear(3), symbp.activation("exp(400*x)"), symbp.linear(2)],
        input_features=2,
        loss="mse",
    )
    assert symbp.check(net).passed


#: the unknown, the kept value it is solved from, and other symbols of a forward definition
u, t = sp.Dummy("u", real=True), sp.Symbol("t", real=True)
mu, epsilon = sp.Symbol("mu", real=True), sp.Symbol("epsilon", positive=True)


@pytest.mark.parametrize(
    ("equation", "peels"),
    [
        (lambda: t - sp.exp(u) / (1 + sp.exp(u)), True),  # Möbius in exp(u), then exp
        (lambda: t - 2 / (1 + sp.exp(-2 * u)) + 1, True),
        (lambda: t - sp.tanh(sp.tanh(u)), True),  # peels; atanh(atanh(t)) is refused later
        (lambda: t - sp.Max(0, sp.exp(u) - 1), True),
        (lambda: t - 1 / (1 + u), True),
        (lambda: t - (u - mu) * sp.Symbol("invstd", positive=True), True),  # batch norm's xhat
        (lambda: t - (u + epsilon) ** sp.Rational(-1, 2), True),  # invstd from var
        (lambda: t - sp.log(u), True),  # lse from the sum of exponentials
        (lambda: t - u + sp.Max(u, 0), False),  # two kernels: u and max(u, 0)
        (lambda: t - u * sp.tanh(sp.log(1 + sp.exp(u))), False),  # mish
        (lambda: t - sp.exp(-u**2 / 3) * sp.sin(7 * u / 9), False),  # two kernels
        (lambda: t - u**3 - u, False),  # degree 3: radicals
        (lambda: t - (1 + u) ** 100000, False),  # degree 100000, not expanded to find out
        (lambda: t - sp.exp(-(u**2)), False),  # exp peels, its argument has degree 2
        (lambda: t - (sp.exp(u) - sp.exp(-u)) / (sp.exp(u) + sp.exp(-u)), False),
    ],
)
def test_which_equations_peel(equation, peels):
    assert _peels(equation(), u) is peels


@pytest.mark.parametrize(
    "text",
    ["exp(-0.3333333333333*x**2)*sin(0.7777777777*x)", "(1+x)**100000", "x**3 + x"],
)
def test_an_output_equation_that_does_not_peel_is_never_handed_to_sympy(monkeypatch, text):
    """sympy's solveset grew past 24 GB on the first and took minutes on the second, to find
    no usable solution: the derivation reads x, without asking."""
    asked = []

    def solveset(*args, **kwargs):
        asked.append(args[0])
        return sp.EmptySet

    monkeypatch.setattr(sp, "solveset", solveset)
    form = layers.Activation(text).forward_form((3,))
    derivation = derive_layer(form)
    assert asked == []
    assert derivation.stored == ("x",)
    output = form.output.expr
    assert sp.simplify(derivation.vjp["x"].expr - dy[n, j] * sp.diff(output, x[n, j])) == 0


# -- costly values computed once for both passes ---------------------------------------------
def _carried(derivation: LayerDerivation) -> dict[str, sp.Expr]:
    return {c.name: c.math for c in derivation.carried}


def test_gelu_and_silu_keep_the_function_value_their_backward_needs_again():
    """GELU'(x) = Phi(x) + x*phi(x) and SiLU'(x) = s(x)*(1 + x*(1 - s(x))) reuse the forward
    pass's erf(x/sqrt(2)) and sigmoid(x) (textbook forms, written out here)."""
    gelu = derivation_of("gelu")
    assert _carried(gelu) == {"erf_x": sp.erf(x[n, j] / sp.sqrt(2))}
    assert [a.name for a in gelu.cached] == ["x", "erf_x"]  # the code still reads x itself
    silu = derivation_of("silu")
    assert _carried(silu) == {"sigmoid_x": 1 / (1 + sp.exp(-x[n, j]))}
    assert [a.name for a in silu.cached] == ["x", "sigmoid_x"]


@pytest.mark.parametrize(
    "case_id", ["relu", "sigmoid", "tanh", "softplus", "elu", "leaky_relu", "batchnorm", "linear"]
)
def test_layers_whose_backward_repeats_no_costly_forward_value_keep_nothing_more(case_id):
    """Sigmoid and tanh read their output; softplus' forward has no sigmoid in it; ELU's
    exp(x) is printed as expm1 in the forward pass (keeping exp(x) would lose that)."""
    assert derivation_of(case_id).carried == ()


def test_nested_values_are_kept_outermost_first_and_the_input_is_dropped():
    """d/dx [tanh(tanh(x)) + tanh(x)] = (1 - tanh(tanh(x))**2)*(1 - tanh(x)**2) + 1 - tanh(x)**2:
    both values are kept, and the backward no longer reads x at all."""
    derivation = derive_layer(layers.Activation("tanh(tanh(x)) + tanh(x)").forward_form((3,)))
    assert _carried(derivation) == {
        "tanh_tanh_x": sp.tanh(sp.tanh(x[n, j])),
        "tanh_x": sp.tanh(x[n, j]),
    }
    assert [a.name for a in derivation.cached] == ["tanh_tanh_x", "tanh_x"]
    expected = ((1 - sp.tanh(sp.tanh(x[n, j])) ** 2) * (1 - sp.tanh(x[n, j]) ** 2) + 1
                - sp.tanh(x[n, j]) ** 2) * dy[n, j]
    assert sp.expand(derivation.vjp["x"].expr - expected) == 0


def test_every_kept_value_is_in_the_forward_formula_and_read_by_the_backward():
    from symbp.derivation.stable import stabilize

    for case_id in ["gelu", "silu"]:
        derivation = derivation_of(case_id)
        forward = stabilize(derivation.form.output.expr)
        backward = stabilize(derivation.vjp["x"].expr)
        for value in derivation.carried:
            assert forward.has(value.expr) and backward.has(value.expr)


# -- losses -------------------------------------------------------------------------------------
def test_softmax_cross_entropy_gives_softmax_minus_onehot_over_n():
    derivation = derivation_of("softmax_cross_entropy")
    z, labels, lse = array("z"), array("Y"), array("lse")
    dz = derivation.vjp["z"]
    assert dz.indices == (n, c)
    assert sp.expand(dz.expr - (sp.exp(z[n, c] - lse[n]) - labels[n, c]) / N) == 0
    # With the stored log-sum-exp written out, it is the softmax itself.
    total = sp.Sum(sp.exp(z[n, k]), (k, 0, C - 1))
    softmax = sp.exp(z[n, c]) / total
    assert sp.expand(dz.expr.xreplace({lse[n]: sp.log(total)}) - (softmax - labels[n, c]) / N) == 0


def test_bce_with_logits_gives_sigmoid_minus_target_over_count():
    z, t = array("z"), array("t")
    derived = derivation_of("bce_with_logits").vjp["z"].expr
    expected = (1 / (1 + sp.exp(-z[n, j])) - t[n, j]) / (N * F)
    assert sp.simplify(derived - expected) == 0


def test_mse_gives_twice_the_error_over_count():
    z, t = array("z"), array("t")
    derived = derivation_of("mse").vjp["z"].expr
    assert sp.expand(derived - 2 * (z[n, j] - t[n, j]) / (N * F)) == 0


# -- linear in whole-array form -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("param", "code"), [("x", "dz @ W.T"), ("W", "x.T @ dz"), ("b", "dz.sum(axis=0)")]
)
def test_linear_whole_array_form(param, code):
    derivation = derivation_of("linear")
    names = set(derivation.form.arrays) | {derivation.upstream.name}
    adjoint = derivation.vjp[param]
    assert numpy_code(Lowering(names).lower(adjoint.expr, adjoint.indices)) == code


def test_linear_backward_reads_x_and_w():
    assert set(derivation_of("linear").stored) == {"x", "W"}


# -- kinks: PyTorch's conventions ---------------------------------------------------------------
def derivative_at(derivation: LayerDerivation, value) -> sp.Expr:
    """dx/dy of an element-wise layer at input ``value``, the stored output written out."""
    output = derivation.form.output
    expr = derivation.vjp["x"].expr.xreplace({output.array[output.indices]: output.expr})
    return sp.simplify(expr.xreplace({x[n, j]: value, dy[n, j]: 1}))


def test_sympy_alone_would_give_relu_half_at_zero():
    """Why a convention is needed at all: sympy's own derivative of max(0, x) at 0 is 1/2."""
    u = sp.Symbol("u", real=True)
    assert sp.diff(sp.Max(0, u), u).subs(u, 0) == sp.Rational(1, 2)


# (value at -1, at 0, at 1). PyTorch: relu/abs give 0 at 0; leaky_relu, prelu, rrelu take the
# negative-side slope at 0 (``x > 0 ? g : g * slope``); elu's negative branch alpha*exp(x) at 0.
KINKS = {
    "relu": (0, 0, 1),
    "leaky_relu": (sp.Symbol("slope", positive=True),) * 2 + (1,),
    "prelu_shared": (sp.Symbol("alpha", real=True),) * 2 + (1,),
    "rrelu": (array("r", positive=True)[n, j],) * 2 + (1,),
    "elu": (sp.Symbol("alpha", positive=True) * sp.exp(-1), sp.Symbol("alpha", positive=True), 1),
    "activation_abs": (-1, 0, 1),
    "activation_kinked": (sp.Rational(1, 10), 0, 1),
}


@pytest.mark.parametrize("case_id", sorted(KINKS))
def test_derivative_at_and_around_the_kink(case_id):
    derivation = derivation_of(case_id)
    got = tuple(derivative_at(derivation, value) for value in (-1, 0, 1))
    assert got == KINKS[case_id]


def test_relu_derivative_at_zero_is_zero():
    assert derivative_at(derivation_of("relu"), 0) == 0
    assert derivative_at(derivation_of("relu"), sp.Rational(1, 10**9)) == 1


# -- user expressions derive exactly like the built-ins they spell out ---------------------------
@pytest.mark.parametrize(
    ("text", "builtin"),
    [
        ("1/(1 + exp(-x))", layers.Sigmoid),
        ("tanh(x)", layers.Tanh),
        ("max(0, x)", layers.Relu),
        ("log(1 + exp(x))", layers.Softplus),
        ("x/(1 + exp(-x))", layers.Silu),
        ("x*(1 + erf(x/sqrt(2)))/2", layers.Gelu),
    ],
)
def test_user_expression_derives_like_the_builtin(text, builtin):
    user = derive_layer(layers.Activation(text).forward_form((3,)))
    reference = derive_layer(builtin().forward_form((3,)))
    assert user.stored == reference.stored
    assert user.vjp["x"].expr == reference.vjp["x"].expr


def _as_function_of_x(derivation: LayerDerivation) -> sp.Expr:
    output = derivation.form.output
    expr = derivation.vjp["x"].expr.xreplace({output.array[output.indices]: output.expr})
    u = sp.Symbol("u", real=True)
    return expr.xreplace({x[n, j]: u, dy[n, j]: 1})


def _difference(user: LayerDerivation, reference: LayerDerivation) -> sp.Expr:
    """The two derivatives' difference, in the stored output when both keep it, else in x."""
    if user.stored == reference.stored:
        difference = user.vjp["x"].expr - reference.vjp["x"].expr
    else:
        difference = _as_function_of_x(user) - _as_function_of_x(reference)
    return sp.cancel(sp.together(sp.expand(difference.rewrite(sp.exp))))


@pytest.mark.parametrize(
    ("text", "builtin"),
    [
        ("(exp(x) - exp(-x))/(exp(x) + exp(-x))", layers.Tanh),
        ("exp(x)/(1 + exp(x))", layers.Sigmoid),
        ("x*exp(x)/(1 + exp(x))", layers.Silu),
    ],
)
def test_user_expression_spelled_differently_has_the_same_derivative(text, builtin):
    user = derive_layer(layers.Activation(text).forward_form((3,)))
    reference = derive_layer(builtin().forward_form((3,)))
    assert _difference(user, reference) == 0


def test_mish_derivative_matches_the_textbook_formula():
    """Mish'(x) = tanh(sp(x)) + x * sech(sp(x))**2 * sigmoid(x), sp = softplus."""
    u = sp.Symbol("u", real=True)
    softplus = sp.log(1 + sp.exp(u))
    textbook = sp.tanh(softplus) + u * (1 - sp.tanh(softplus) ** 2) / (1 + sp.exp(-u))
    derived = _as_function_of_x(derivation_of("activation_mish"))
    assert sp.simplify(derived - textbook) == 0


ROOT = Path(__file__).resolve().parent.parent


# -- the verifier's sizes and its exact zero test ----------------------------------------------
def _axis_cases(length, kernel, stride, padding, dilation):
    """For one image axis: which kinds of index case the concrete sizes produce (computed here
    from PyTorch's definition of a window, independently of the verifier)."""
    out = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    reads = {}
    border = False
    for p in range(out):
        for i in range(kernel):
            row = p * stride + i * dilation - padding
            border |= not 0 <= row < length
            reads.setdefault(row, []).append(p)
    readers = [len(reads.get(row, [])) for row in range(length)]
    return {"border": border, "unread": 0 in readers, "shared": any(n > 1 for n in readers)}


@pytest.mark.parametrize(
    "layer",
    [conv.Conv2d(2, 3, padding=1), conv.Conv2d(2, 3, stride=2), conv.MaxPool2d(2, stride=2),
     conv.AvgPool2d(3, stride=2, padding=1)],
    ids=lambda layer: layer.describe(),
)
def test_default_sizes_are_distinct_and_meet_every_index_case(layer):
    form = layer.forward_form((2, 8, 8))
    sizes = {str(k): v for k, v in default_sizes(form).items()}
    assert sizes["K_h"] != sizes["K_w"] and sizes["H_in"] != sizes["W_in"]
    assert len({sizes["N"], sizes["H_in"], sizes["W_in"]}) == 3
    stride, padding = sizes.get("stride", 1), sizes.get("padding", 0)
    cases = [
        _axis_cases(sizes[f"{axis}_in"], sizes[kernel], stride, padding, sizes.get("dilation", 1))
        for axis, kernel in (("H", "K_h"), ("W", "K_w"))
    ]
    if padding:
        assert any(case["border"] for case in cases)  # a window reaches into the padding
    if stride > 1:
        assert any(case["unread"] for case in cases) or padding  # a row no window reads
        assert any(case["shared"] for case in cases)  # a row two windows read


def test_batchnorm_on_images_is_proved_at_sizes_that_tell_n_h_and_w_apart():
    form = BatchNorm().forward_form((2, 8, 8))
    runs = [{str(k): v for k, v in default_sizes(form, batch=b).items()} for b in (2, 3)]
    assert all(run["H_in"] * run["W_in"] * run["N"] <= 18 for run in runs)  # small
    assert min(runs[0][k] for k in ("N", "H_in", "W_in")) >= 2  # every reduced axis sums terms
    assert len({runs[1][k] for k in ("N", "H_in", "W_in")}) == 3  # pairwise different


def test_is_zero_proves_root_identities_and_refutes_wrong_ones():
    a, b = sp.symbols("a b", positive=True)
    base = a + b
    assert is_zero(base ** sp.Rational(-3, 2) * base - 1 / sp.sqrt(base))
    assert is_zero(sp.sqrt(base) ** 2 - base)
    assert is_zero((a - b) * (a + b) / sp.sqrt(base) - (a**2 - b**2) * base ** sp.Rational(-1, 2))
    assert not is_zero(1 / sp.sqrt(base) - 1 / base)
    assert not is_zero(base ** sp.Rational(-3, 2) - base ** sp.Rational(-1, 2))
    assert not is_zero(sp.exp(a) * (a + 1) - sp.exp(a) * a)


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda path: path.stem
)
def test_derive_verify_proves_every_example(example, capsys, monkeypatch):
    """``symbp derive --verify`` on every example: every formula proved (cnn_bn ran for more
    than 25 minutes before the verifier was restructured)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one verdict a line
    assert cli.main(["derive", str(example), "--verify"]) == 0
    out = capsys.readouterr().out
    verdicts = [line for line in out.splitlines() if line.startswith("  verify ")]
    # (conv_transpose2d's adjoint claims are identities proved by scalar expansion too)
    assert verdicts and all("proven equal to direct differentiation" in v
                            or (v.startswith("  verify adjoint: ")
                                and v.endswith("proven (scalar expansion)"))
                            for v in verdicts)
