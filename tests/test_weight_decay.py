"""Weight decay in the objective (issue 24, part 3): J = L + s, s = lambda/2 * sum ||W||^2.

The oracle is PyTorch in float64: the same network written with ``torch.nn.functional``, the
L2 term ``lambda/2 * sum(W**2)`` over the covered weights added to the loss, differentiated by
autograd. The generated ``loss_and_grads`` must return J and every gradient of J to 1e-10.
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
    overfull_boxes,
)

import symbp
from symbp import cli
from symbp.checking.gradcheck import check_module, load_module
from symbp.declare.decay import WEIGHT_DECAY
from symbp.declare.spec import parse_spec
from symbp.derivation.network import derive_network
from symbp.emit.notes import render_notes

torch = pytest.importorskip("torch")
F = torch.nn.functional

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mlp_weight_decay.toml"
TOLERANCE = 1e-10

MLP = """
name = "mlp"
input = { features = 6 }
loss = "softmax_cross_entropy"
weight_decay = 0.05
%s
[[layers]]
type = "linear"
name = "fc1"
out = 5

[[layers]]
type = "batchnorm"
name = "bn1"

[[layers]]
type = "prelu"
name = "act"

[[layers]]
type = "linear"
name = "out"
out = 3
"""


def mlp(extra: str = "") -> symbp.Net:
    return parse_spec(MLP % extra)


def conv_net(weight_decay=0.1, **kwargs) -> symbp.Net:
    return symbp.Net(
        [symbp.conv2d(3, 3, padding=1, name="conv1"), symbp.batchnorm(name="bn1"), symbp.relu(),
         symbp.maxpool2d(2), symbp.flatten(), symbp.linear(4, name="out")],
        input_shape=(2, 6, 6), loss="softmax_cross_entropy", weight_decay=weight_decay, **kwargs,
    )


def problem(net: symbp.Net, batch: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) * 0.5 for k, s in net.param_shapes.items()}
    x = rng.standard_normal((batch, *net.input_shape))
    y = rng.integers(0, net.output_shape[0], size=batch)
    return params, x, y


def torch_mlp(p, x):
    h = x @ p["fc1.W"] + p["fc1.b"]
    h = F.batch_norm(h, None, None, p["bn1.gamma"], p["bn1.beta"], training=True, eps=1e-5)
    h = torch.where(h > 0, h, p["act.alpha"] * h)
    return h @ p["out.W"] + p["out.b"]


def torch_conv(p, x):
    h = F.conv2d(x, p["conv1.W"], p["conv1.b"], padding=1)
    h = F.batch_norm(h, None, None, p["bn1.gamma"], p["bn1.beta"], training=True, eps=1e-5)
    h = F.max_pool2d(F.relu(h), 2).flatten(1)
    return h @ p["out.W"] + p["out.b"]


def torch_objective(forward, params, x, y, lam, covered):
    """J = cross entropy + lam/2 * sum(W**2) over ``covered``, and its gradients (autograd)."""
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    loss = F.cross_entropy(forward(p, torch.tensor(x)), torch.tensor(y))
    objective = loss + lam / 2 * sum((p[k] ** 2).sum() for k in covered)
    objective.backward()
    return objective.item(), {k: v.grad.numpy() for k, v in p.items()}


def assert_matches_torch(net, forward, covered, lam):
    module = load_module(symbp.codegen(net))
    params, x, y = problem(net)
    loss, grads = module.loss_and_grads(params, x, y)
    expected, expected_grads = torch_objective(forward, params, x, y, lam, covered)
    assert abs(loss - expected) <= TOLERANCE * abs(expected)
    largest = max(np.max(np.abs(g)) for g in expected_grads.values())
    for key, grad in expected_grads.items():
        # a gradient that is 0 in exact arithmetic (a bias before batch norm) is rounding
        # noise on both sides: held to 1e-10 of 1e-2 of the largest gradient
        scale = max(np.max(np.abs(grad)), 1e-2 * largest)
        assert np.max(np.abs(grads[key] - grad)) <= TOLERANCE * scale, key
    return module


def test_mlp_objective_and_gradients_match_pytorch():
    net = mlp()
    assert net.decayed == ("fc1.W", "out.W")  # the default: linear weights only
    assert_matches_torch(net, torch_mlp, ["fc1.W", "out.W"], 0.05)


def test_conv_objective_and_gradients_match_pytorch():
    net = conv_net()
    assert net.decayed == ("conv1.W", "out.W")
    module = assert_matches_torch(net, torch_conv, ["conv1.W", "out.W"], 0.1)
    assert module.WEIGHT_DECAY == 0.1 and module.DECAYED == ("conv1.W", "out.W")


def test_default_coverage_leaves_out_biases_and_normalisation_parameters():
    """Biases, batch norm's gamma and beta and PReLU's slope get the gradient of L alone:
    the oracle adds the L2 term on the weights only, so a decayed bias would differ."""
    net = mlp()
    assert set(net.param_shapes) - set(net.decayed) == {
        "fc1.b", "bn1.gamma", "bn1.beta", "act.alpha", "out.b"}
    module = load_module(symbp.codegen(net))
    params, x, y = problem(net)
    _, with_decay = module.loss_and_grads(params, x, y)
    _, without = module.loss_and_grads(params, x, y, weight_decay=0.0)
    for key in net.param_shapes:
        extra = 0.05 * params[key] if key in net.decayed else 0.0
        np.testing.assert_allclose(with_decay[key], without[key] + extra, rtol=1e-12, atol=1e-15)


def test_selection_by_names_and_patterns():
    assert mlp('weight_decay_params = ["fc1.W"]').decayed == ("fc1.W",)
    assert mlp('weight_decay_params = ["*.W", "bn1.*"]').decayed == (
        "fc1.W", "bn1.gamma", "bn1.beta", "out.W")
    net = mlp('weight_decay_params = ["*.gamma", "out.b"]')
    assert_matches_torch(net, torch_mlp, ["bn1.gamma", "out.b"], 0.05)
    net = conv_net(weight_decay_params=["conv1.*"])
    assert_matches_torch(net, torch_conv, ["conv1.W", "conv1.b"], 0.1)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("weight_decay = -0.1", "weight_decay", "non-negative"),
        ('weight_decay = "0.1"', "weight_decay", "must be a number"),
        ("weight_decay = true", "weight_decay", "must be a number"),
        ("weight_decay = nan", "weight_decay", "finite"),
        ('weight_decay = 0.1\nweight_decay_params = ["fc2.W"]', "weight_decay_params",
         "'fc2.W' names no parameter"),
        ('weight_decay = 0.1\nweight_decay_params = "fc1.W"', "weight_decay_params",
         "must be a list"),
        ("weight_decay = 0.1\nweight_decay_params = []", "weight_decay_params", "is empty"),
        ('weight_decay_params = ["fc1.W"]', "weight_decay_params", "needs weight_decay"),
    ],
)
def test_declaration_errors_are_one_line_naming_the_field(tmp_path, capsys, extra, field, words):
    spec = tmp_path / "bad.toml"
    spec.write_text(MLP.replace("weight_decay = 0.05\n", "") % extra)
    assert cli.main(["codegen", str(spec), "-o", "-"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"symbp: error: {spec}: field '{field}': ")
    assert words in captured.err


def test_python_api_errors():
    layers = [symbp.linear(3)]
    with pytest.raises(symbp.SpecError, match="non-negative"):
        symbp.Net(layers, input_features=2, loss="mse", weight_decay=-1)
    with pytest.raises(symbp.SpecError, match="needs a loss"):
        symbp.Net(layers, input_features=2, weight_decay=0.1)
    with pytest.raises(symbp.SpecError, match="covers no parameter"):
        symbp.Net([symbp.relu()], input_features=2, loss="mse", weight_decay=0.1)


def test_zero_or_absent_weight_decay_generates_the_same_module():
    """weight_decay = 0 is no regulariser: the module is byte for byte the one without the key
    (and so the examples' modules are what they were before weight decay existed)."""
    plain = symbp.codegen(parse_spec(MLP.replace("weight_decay = 0.05\n", "") % ""))
    assert symbp.codegen(parse_spec(MLP.replace("0.05", "0") % "")) == plain
    assert "WEIGHT_DECAY" not in plain and "regularizer" not in plain
    assert symbp.codegen(mlp()) == symbp.codegen(mlp())  # deterministic


def test_the_gradient_of_s_is_derived_by_the_engine():
    """Each term's gradient comes out of differentiating s = lambda/2 * sum W**2: lambda*W."""
    (term, _) = derive_network(mlp()).decay
    W = term.derivation.form.inputs[0]
    adjoint = term.derivation.vjp["W"]
    assert sp.simplify(adjoint.expr - WEIGHT_DECAY * W[adjoint.indices]) == 0
    source = symbp.codegen(mlp())
    assert "dW = weight_decay*W" in source  # printed from that derivation
    assert "WEIGHT_DECAY = 0.05" in source and "weight_decay=WEIGHT_DECAY" in source


def test_float32_and_the_empty_batch():
    net = symbp.Net([symbp.linear(4, name="fc1"), symbp.tanh(), symbp.linear(3, name="out")],
                    input_features=5, loss="softmax_cross_entropy", weight_decay=0.5)
    module = load_module(symbp.codegen(net))
    params = module.init_params(dtype=np.float32)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 5)).astype(np.float32), rng.integers(0, 3, 4)
    loss, grads = module.loss_and_grads(params, x, y)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    # no samples: L is the mean over none (NaN, as PyTorch), dL/dW = 0, so dJ/dW = lambda*W
    loss, grads = module.loss_and_grads(params, x[:0], y[:0])
    assert np.isnan(loss)
    np.testing.assert_array_equal(grads["fc1.W"], np.float32(0.5) * params["fc1.W"])
    np.testing.assert_array_equal(grads["out.b"], 0)


@pytest.mark.parametrize(
    ("line", "wrong"),
    [("s = (1/2)*weight_decay", "s = weight_decay"),  # s twice what its gradient says
     ("dW = weight_decay*W", "dW = 2*weight_decay*W")],  # ds/dW twice the derivative of s
)
def test_check_compares_the_gradient_of_J(line, wrong):
    """symbp check takes finite differences of J: a module whose regulariser and its gradient
    disagree fails, in the rows of the covered weights and the network's."""
    net = mlp()
    right = symbp.codegen(net)
    assert check_module(net, load_module(right)).passed
    assert right.count(line) == 1
    report = check_module(net, load_module(right.replace(line, wrong)))
    failed = {row.name for row in report.rows if not row.passed}
    assert {"fc1.W", "out.W"} <= failed
    assert any(name.startswith("vjp direction") for name in failed)


def test_the_example_checks_derives_and_flows(capsys):
    for command in (["check"], ["flow", "--batch", "8"], ["derive", "--ascii", "--verify"]):
        assert cli.main([command[0], str(EXAMPLE), *command[1:]]) == 0
        text = capsys.readouterr().out
    assert "== objective: J = L + s" in text
    assert "dW = W*weight_decay" in text
    assert "dJ/dfc1.W[i, j] = dL/dfc1.W[i, j] + weight_decay*fc1.W[i, j]" in text
    assert "FAILED" not in text


def test_notes_name_L_s_and_J_and_the_two_paths():
    notes = render_notes(derive_network(symbp.load_spec(EXAMPLE)), fmt="md")
    assert "J &= L + s" in notes
    assert (r"s &= \frac{\lambda}{2} \left(\lVert \mathbf{W}^{(1)} \rVert^2 + "
            r"\lVert \mathbf{W}^{(3)} \rVert^2\right)") in notes
    assert (r"\frac{\partial J}{\partial \mathbf{W}} &= \frac{\partial J}{\partial L} "
            r"\frac{\partial L}{\partial \mathbf{W}} + \frac{\partial J}{\partial s} "
            r"\frac{\partial s}{\partial \mathbf{W}}") in notes
    assert (r"\frac{\partial J}{\partial \mathbf{W}^{(3)}} &= \frac{\partial L}"
            r"{\partial \mathbf{W}^{(3)}} + \lambda \mathbf{W}^{(3)}") in notes
    assert r"\frac{\partial s}{\partial W_{ij}} &= \lambda W_{ij}" in notes


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize(
    ("net", "notation"),
    [("example", "d2l"),
     pytest.param("conv", "d2l", marks=pytest.mark.slow),  # proving the conv layer: 15 s
     pytest.param("conv", "cs231n", marks=pytest.mark.slow)],
)
def test_notes_with_weight_decay_compile(net, notation, tmp_path):
    net = conv_net() if net == "conv" else symbp.load_spec(EXAMPLE)
    tex = render_notes(derive_network(net), fmt="tex", notation=notation)
    ok, log, _ = compile_latex(tex, tmp_path)
    assert ok, log[-3000:]
    assert overfull_boxes(log, min_pt=1.0) == []


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize("net", ["example", pytest.param("conv", marks=pytest.mark.slow)])
def test_notes_with_weight_decay_parse_with_katex(net):
    net = conv_net() if net == "conv" else symbp.load_spec(EXAMPLE)
    notes = render_notes(derive_network(net), fmt="md")
    assert katex_errors(extract_markdown_math(notes)) == []
