"""``symbp flow``: the proved bounds against sampled derivatives and Jacobians, the memory formula
against the generated cache, the command's exit codes and its figure."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symbp
from symbp import cli
from symbp.declare.conv import Conv2d, Flatten, MaxPool2d
from symbp.declare.layers import X
from symbp.flow import (
    LayerMax,
    OperatorNorm,
    backward_trace,
    flow_bounds,
    measure,
    memory_model,
    predicted_bytes,
    supremum_abs,
    total_elements,
)
from symbp.flow.memory import measure_cache
from symbp.flow.numeric import loss_gradient, setup, singular_extremes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
BCE = str(ROOT / "examples" / "bce.toml")
N = sp.Symbol("N", integer=True, positive=True)


def one_activation(layer) -> symbp.Net:
    return symbp.Net(
        [symbp.linear(3, name="fc"), layer, symbp.linear(2, name="out")],
        input_features=2,
        loss="mse",
    )


def central_difference(f, x, h=1e-5):
    return (f(x + h) - f(x - h)) / (2 * h)


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(x / 2))


_erf = np.vectorize(math.erf, otypes=[float])


# Forward functions written here from their textbook definitions, independently of symbp.
ACTIVATIONS = {
    "sigmoid": (symbp.sigmoid(name="act"), _sigmoid),
    "tanh": (symbp.tanh(name="act"), np.tanh),
    "relu": (symbp.relu(name="act"), lambda x: np.maximum(x, 0.0)),
    "softplus": (symbp.softplus(name="act"), lambda x: np.logaddexp(0.0, x)),
    "gelu": (symbp.gelu(name="act"), lambda x: x * (1 + _erf(x / math.sqrt(2))) / 2),
    "leaky_relu": (symbp.leaky_relu(0.2, name="act"), lambda x: np.where(x > 0, x, 0.2 * x)),
    "leaky_relu_steep": (
        symbp.leaky_relu(3.0, name="act"),
        lambda x: np.where(x > 0, x, 3.0 * x),
    ),
    "elu": (symbp.elu(2.0, name="act"), lambda x: np.where(x > 0, x, 2.0 * np.expm1(x))),
    "bump": (symbp.activation("exp(-x**2)", name="act"), lambda x: np.exp(-(x**2))),
    "rational": (symbp.activation("x/(1 + x**2)", name="act"), lambda x: x / (1 + x**2)),
}


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation_bound_is_the_sampled_supremum(kind):
    """Sampled |f'| never exceeds the proved bound and comes within 0.1% of it (a supremum)."""
    layer, forward = ACTIVATIONS[kind]
    row = flow_bounds(symbp.derive(one_activation(layer)))[1]
    assert row.structure == "diagonal" and row.bound is not None, row.reason
    bound = float(row.bound)
    grid = np.linspace(-30, 30, 600_001)
    grid = grid[np.abs(grid) > 2e-5]  # no central difference straddles the kink at 0
    sampled = np.abs(central_difference(forward, grid))
    assert sampled.max() <= bound + 1e-7
    assert sampled.max() >= bound * (1 - 1e-3)


def test_textbook_bounds_come_out_exactly():
    """The classic facts: sigmoid' <= 1/4, tanh' <= 1, ReLU' in {0, 1}, leaky ReLU Max(1, slope)."""
    rows = {
        kind: flow_bounds(symbp.derive(one_activation(ACTIVATIONS[kind][0])))[1]
        for kind in ("sigmoid", "tanh", "relu", "leaky_relu", "leaky_relu_steep")
    }
    assert rows["sigmoid"].bound == sp.Rational(1, 4)
    assert rows["tanh"].bound == 1
    assert rows["relu"].bound == 1 and "{0, 1}" in rows["relu"].reason
    assert rows["leaky_relu"].bound == 1
    assert rows["leaky_relu_steep"].bound == 3
    a = sp.Symbol("slope", positive=True)
    assert rows["leaky_relu"].bound_general.subs(a, 5) == 5


@pytest.mark.parametrize(("lower", "upper", "bound"), [(0.125, 1 / 3, 1), (0.5, 2.0, 2)])
def test_rrelu_bound_is_its_largest_slope_over_the_declared_range(lower, upper, bound):
    """RReLU's f' is 1 or a slope r drawn from [lower, upper]: sup |f'| = max(1, upper), a
    number, not a maximum over the entries of r (the notes printed max(1, r_nj))."""
    net = symbp.Net([symbp.rrelu(lower=lower, upper=upper)], input_features=3, loss="mse")
    (row,) = flow_bounds(symbp.derive(net))
    assert row.bound == bound and not row.bound.has(LayerMax)
    assert "r in [lower, upper]" in row.reason
    upper_symbol = next(s for s in row.bound_general.free_symbols if s.name == "upper")
    assert row.bound_general.subs(upper_symbol, 5) == 5
    notes = str(symbp.notes(net, fmt="md", flow=True))
    assert "\\max\\left(1, r_{nj}\\right)" not in notes


def test_supremum_by_calculus():
    assert supremum_abs(sp.diff(1 / (1 + sp.exp(-X)), X), X).value == sp.Rational(1, 4)
    found = supremum_abs(X * sp.exp(-(X**2)), X)  # max at x = 1/sqrt(2)
    assert sp.simplify(found.value - sp.exp(-sp.Rational(1, 2)) / sp.sqrt(2)) == 0
    assert found.attained
    assert supremum_abs(X**2, X).value == sp.oo
    assert not supremum_abs(X**2, X).bounded
    approached = supremum_abs(sp.exp(X) / (1 + sp.exp(X)), X)  # softplus': 1 only at +oo
    assert approached.value == 1 and not approached.attained
    # SiLU's critical point solves x tanh(x/2) = 2: no closed form, so no bound, not a guess.
    assert supremum_abs(sp.diff(X / (1 + sp.exp(-X)), X), X) is None


def test_sigmoid_chain_is_a_power_of_a_quarter():
    net = symbp.load_spec(ROOT / "examples" / "deep_sigmoid.toml")
    rows = flow_bounds(symbp.derive(net))
    norms = rows[0].product.atoms(OperatorNorm)
    assert len(norms) == 9  # fc1..fc8 and out
    assert sp.simplify(rows[0].product / sp.Mul(*norms)) == sp.Rational(1, 4) ** 8
    assert rows[-1].product == rows[-1].bound  # the last layer's chain is itself


def _small_nets():
    width = 5
    yield (
        "sigmoid",
        symbp.Net(
            [
                symbp.linear(width),
                symbp.sigmoid(),
                symbp.linear(width),
                symbp.sigmoid(),
                symbp.linear(3),
            ],
            input_features=4,
            loss="softmax_cross_entropy",
        ),
    )
    yield (
        "batchnorm",
        symbp.Net(
            [
                symbp.linear(width),
                symbp.batchnorm(name="bn"),
                symbp.tanh(),
                symbp.linear(width),
                symbp.batchnorm(name="bn2"),
                symbp.leaky_relu(2.5),
                symbp.linear(3),
            ],
            input_features=4,
            loss="mse",
        ),
    )
    yield (
        "residual",
        symbp.Net(
            [
                symbp.linear(width),
                symbp.elu(1.5),
                symbp.residual([symbp.linear(width), symbp.batchnorm(), symbp.relu()], name="res"),
                symbp.residual([symbp.linear(width), symbp.prelu(shared=False)], name="res2"),
                symbp.linear(2),
            ],
            input_features=3,
            loss="bce_with_logits",
        ),
    )


def _perturbed(module, seed):
    """Initial parameters moved away from their defaults (gamma, slopes), so no bound is 1."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed)
    for key, value in params.items():
        if key.endswith((".gamma", ".alpha")):
            params[key] = value + rng.normal(0.0, 1.0, value.shape)
        elif key.endswith(".W"):
            params[key] = value * rng.uniform(0.5, 3.0)
    return params


@pytest.mark.parametrize("name,net", list(_small_nets()), ids=[n for n, _ in _small_nets()])
def test_sampled_jacobian_norms_never_exceed_the_bounds(name, net):
    rows = flow_bounds(symbp.derive(net))
    assert all(row.bound is not None for row in rows), [r.reason for r in rows]
    module = setup(net, batch=2, seed=0)[0]
    for seed in range(3):
        measured = measure(
            net,
            rows,
            batch=8,
            seed=seed,
            jacobian_batch=3,
            module=module,
            params=_perturbed(module, seed),
        )
        assert measured.jacobian_batch == 3
        for row in measured.rows:
            assert row.jacobian[0] <= row.jacobian_bound * (1 + 1e-9) + 1e-12, row.layer
            assert row.chain[0] <= row.chain_bound * (1 + 1e-9) + 1e-12, row.layer
            # and on the gradient itself, at the measuring batch
            assert row.grad_in <= row.product * measured.dout * (1 + 1e-9) + 1e-12, row.layer


def test_batchnorm_bound_is_tight():
    """||J_bn||_2 = max_j |gamma_j| invstd_j exactly (the projection has eigenvalue 1)."""
    net = dict(_small_nets())["batchnorm"]
    rows = flow_bounds(symbp.derive(net))
    bn = next(r for r in rows if r.layer == "bn")
    assert isinstance(bn.bound, LayerMax)
    module = setup(net, batch=2, seed=0)[0]
    measured = measure(
        net, rows, batch=8, jacobian_batch=4, module=module, params=_perturbed(module, 1)
    )
    row = next(r for r in measured.rows if r.layer == "bn")
    assert row.jacobian[0] == pytest.approx(row.jacobian_bound, rel=1e-9)


def test_trace_matches_the_generated_backward():
    net = dict(_small_nets())["residual"]
    module, params, x, y = setup(net, batch=6, seed=3)
    _, grads = module.loss_and_grads(params, x, y)
    out, cache = module.forward(params, x, train=True)
    _, dout = loss_gradient(net, module, out, y)
    trace = backward_trace(net, module, params, cache, dout)
    assert set(trace.grads) == set(params)
    for key in params:
        np.testing.assert_allclose(trace.grads[key], grads[key], rtol=1e-12, atol=1e-14)
    first = next(net.walk()).name
    np.testing.assert_allclose(trace.grad_in[first], grads["x"], rtol=1e-12)


def test_conv_layers_get_no_bound_rather_than_an_error():
    net = symbp.Net(
        [
            Conv2d(2, 3, padding=1, name="conv"),
            symbp.relu(),
            MaxPool2d(2),
            Flatten(),
            symbp.linear(3, name="out"),
        ],
        input_shape=(1, 6, 6),
        loss="softmax_cross_entropy",
    )
    rows = {row.layer: row for row in flow_bounds(symbp.derive(net))}
    assert rows["conv"].bound is None and "no bound" in rows["conv"].reason
    assert rows["relu2"].bound == 1
    assert rows["out"].bound == OperatorNorm(sp.Symbol("W"), sp.Symbol("out"))
    assert rows["conv"].product is None
    # The cache formula still follows from the forward definitions: the zero-padded input
    # (1 channel, 8 x 8) per sample.
    model = {layer.layer: layer for layer in memory_model(net)}
    assert model["conv"].elements == 64 * N


# -- memory --------------------------------------------------------------------------------------
def test_memory_formula_by_hand():
    """linear 5->8 keeps x (5N), sigmoid keeps y (8N), the next linear's x is that same y."""
    net = symbp.Net(
        [symbp.linear(8, name="fc1"), symbp.sigmoid(name="act"), symbp.linear(3, name="fc2")],
        input_features=5,
        loss="mse",
    )
    model = memory_model(net)
    assert total_elements(model) == 13 * N
    fc2 = next(layer for layer in model if layer.layer == "fc2")
    assert fc2.entries[0].shared_with == "act.y"
    assert predicted_bytes(model, 10, np.float32) == 13 * 10 * 4


@pytest.mark.parametrize("spec", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_memory_formula_equals_the_measured_cache(spec):
    net = symbp.load_spec(spec)
    model = memory_model(net)
    module = setup(net, batch=2, seed=0)[0]
    for batch in (2, 5, 33):
        for dtype in (np.float64, np.float32):
            measured = measure_cache(net, module, batch=batch, dtype=dtype)
            assert predicted_bytes(model, batch, dtype) == measured, (batch, dtype)


# -- the command ---------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["flow", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flow_command_prints_three_tables(capsys):
    code, out, err = run(capsys, BCE, "--batch", "1,7")
    assert code == 0 and err == ""
    assert "bound on ||J||_2" in out
    assert "tanh (diagonal)" in out and "sup|f'| = 1, attained at x = 0" in out
    assert "|dL/d input|" in out and "s_max J" in out
    assert "N = 7" in out and "DIFFERS" not in out and out.count("(matches)") == 1
    # batch norm does not train on a batch of one: predicted, not measured
    assert "N = 1 " in out and "not measured: bn2: batch norm needs more than one value" in out


def test_flow_command_draws_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")  # the optional extra symbp[plot]; in the test extra too
    figure = tmp_path / "flow.png"
    code, out, err = run(capsys, BCE, "--batch", "7", "--plot", str(figure))
    assert code == 0 and err == "" and "|dL/d input|" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flow_plot_without_matplotlib_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    """Where matplotlib is not installed, --plot says how to get it (before any work)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = run(capsys, BCE, "--plot", str(tmp_path / "flow.png"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "pip install 'symbp[plot]'" in err
    assert not (tmp_path / "flow.png").exists()


@pytest.mark.parametrize(
    "argv,field",
    [
        (["missing.toml"], "missing.toml"),
        ([BCE, "--batch", "2,x"], "--batch"),
        ([BCE, "--batch", "0"], "--batch"),
        ([BCE, "--grad-batch", "1"], "--grad-batch"),
        ([BCE, "--plot", "no/such/folder/flow.png"], "--plot"),
        ([BCE, "--plot", "flow.txt"], "--plot"),
    ],
)
def test_flow_bad_input_exits_2_with_one_line(capsys, argv, field):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("symbp: error:") and field in err


def test_a_plot_path_that_is_a_folder_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "flow.png").mkdir()
    code, out, err = run(capsys, BCE, "--plot", str(tmp_path / "flow.png"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--plot" in err and "is a folder" in err


def test_a_plot_that_cannot_be_written_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def refuse(self, path, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Figure, "savefig", refuse)
    code, out, err = run(capsys, BCE, "--plot", str(tmp_path / "flow.png"))
    assert code == 2 and "|dL/d input|" in out  # the tables came first
    assert err.count("\n") == 1 and "--plot" in err and "Permission denied" in err


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_network_that_computes_nan_gets_its_tables(capsys, tmp_path):
    # sqrt(x) is NaN for half the inputs: the Jacobians hold NaN and have no singular values
    # (numpy's SVD raised LinAlgError); the tables say '-' there instead.
    spec = tmp_path / "sqrt.toml"
    spec.write_text(
        'input = { features = 3 }\nloss = "mse"\n'
        '[[layers]]\ntype = "linear"\nout = 3\n'
        '[[layers]]\ntype = "activation"\nexpr = "sqrt(x)"\n'
        '[[layers]]\ntype = "linear"\nout = 2\n',
        encoding="utf-8",
    )
    code, out, err = run(capsys, str(spec))
    assert code == 0 and err == ""
    assert "loss nan" in out and "s_max J" in out
    assert singular_extremes(np.array([[np.nan, 1.0], [0.0, 1.0]])) == pytest.approx(
        (math.nan, math.nan), nan_ok=True
    )
    assert singular_extremes(np.diag([3.0, 0.5])) == pytest.approx((3.0, 0.5))


def test_residual_chain_bound_is_one_factor_per_block():
    """(1 + ||W_k||_2 / 4) per sigmoid block: the bound stays a product, linear in the depth."""
    layers = [symbp.linear(3, name="stem")]
    layers += [symbp.residual([symbp.linear(3), symbp.sigmoid()], name=f"b{k}") for k in range(12)]
    net = symbp.Net(layers, input_features=2, loss="mse")
    product = flow_bounds(symbp.derive(net))[0].product
    factors = sp.Mul.make_args(product)
    assert len(factors) == 13
    blocks = [f for f in factors if isinstance(f, sp.Add)]
    assert len(blocks) == 12
    for factor in blocks:
        (norm,) = factor.atoms(OperatorNorm)
        assert sp.simplify(factor - (1 + norm / 4)) == 0
