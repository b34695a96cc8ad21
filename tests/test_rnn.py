"""Recurrent networks and backpropagation through time (issue 25, part 3).

* the tanh cell (one time step) is declared as index-notation stages and its VJPs derived by the
  engine, proved against direct differentiation at small sizes;
* the generated module runs the derived cell over time and backwards over time (BPTT), and
  agrees with ``nn.RNN(batch_first=True)`` in float64 to 1e-10: the output and every gradient
  (dx included), the last state and the whole sequence; likewise the LSTM (two derived parts
  per step, the cell state's and the hidden state's) against ``nn.LSTM``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from symbp.checking.gradcheck import load_module
from symbp.declare.forms import N
from symbp.declare.recurrent import HIDDEN, D, LSTMOutput, LSTMState, RNNCell
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import verify_layer
from symbp.emit.recurrent import lstm_module, recurrent_module

torch = pytest.importorskip("torch")

TOLERANCE = 1e-10
TORCH_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0",
               "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}


def test_cell_derivation_is_proved():
    derivation = derive_layer(RNNCell(2).forward_form())
    for staged in (False, True):
        verdicts = verify_layer(derivation, {N: 2, D: 2, HIDDEN: 2}, staged=staged)
        assert verdicts and all(v.proven for v in verdicts)


def test_cell_backward_reads_the_recurrence():
    """dh (the previous state's gradient) is W_hh^T applied to the pre-activation's gradient,
    which is dh_new * (1 - h_new**2) in terms of the kept output (tanh' = 1 - tanh**2): the
    engine's, not typed anywhere."""
    import sympy as sp

    derivation = derive_layer(RNNCell(2).forward_form())
    text = str(derivation.vjp["h"].expr)
    assert "W_hh" in text and "da" in text
    n, j = sp.symbols("n j", integer=True)
    da = derivation.through["a"].expr
    dh_new, h_new = (sp.IndexedBase(name, real=True)[n, j] for name in ("dh_new", "h_new"))
    assert "h_new" in str(da) and "tanh" not in str(da)
    assert sp.expand(da - dh_new * (1 - h_new**2)) == 0


SIZES = [(3, 5, 4, 6), (1, 1, 2, 3), (2, 7, 1, 1)]


@pytest.mark.parametrize("part", [LSTMState, LSTMOutput])
def test_lstm_parts_are_proved(part):
    derivation = derive_layer(part(2).forward_form())
    verdicts = verify_layer(derivation, {N: 1, D: 1, HIDDEN: 2})
    assert verdicts and all(v.proven for v in verdicts)


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize(("n", "t", "d", "h"), SIZES)
def test_lstm_agrees_with_torch(sequence, n, t, d, h):
    module = load_module(lstm_module(h, (t, d)))
    _agrees(module, torch.nn.LSTM(d, h, batch_first=True), sequence, n, t, d)


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize(("n", "t", "d", "h"), SIZES)
def test_rnn_agrees_with_torch(sequence, n, t, d, h):
    module = load_module(recurrent_module(RNNCell(h), (t, d)))
    _agrees(module, torch.nn.RNN(d, h, batch_first=True), sequence, n, t, d)


def _agrees(module, rnn, sequence, n, t, d):
    """The module's output and gradients against the torch module's (weights mapped by name)."""
    rng = np.random.default_rng(n * 100 + t * 10 + d)
    x = rng.normal(size=(n, t, d))
    params = {k: rng.normal(scale=0.6, size=s) for k, s in module.PARAM_SHAPES.items()}
    out, caches = module.forward(x, params, sequence=sequence)
    dout = rng.normal(size=out.shape)
    dx, grads = module.backward(dout, caches, params, sequence=sequence)

    rnn = rnn.double()
    with torch.no_grad():
        for name, torch_name in TORCH_NAMES.items():
            getattr(rnn, torch_name).copy_(torch.from_numpy(params[name]))
    xt = torch.from_numpy(x).requires_grad_()
    states, last = rnn(xt)
    last = last[0] if isinstance(last, tuple) else last  # an LSTM's (h_n, c_n)
    expected = states if sequence else last[0]
    (expected * torch.from_numpy(dout)).sum().backward()

    assert out.shape == tuple(expected.shape)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=TOLERANCE)
    for name, torch_name in TORCH_NAMES.items():
        np.testing.assert_allclose(grads[name], getattr(rnn, torch_name).grad.numpy(),
                                   rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize("kind", ["rnn", "lstm", "network", "lstm_network", "stacked"])
def test_generated_module_is_lint_clean(tmp_path, kind):
    import subprocess

    from symbp.declare.spec import load_spec, parse_spec
    from symbp.emit.module import generate_module

    path = tmp_path / f"{kind}_module.py"
    sources = {
        "rnn": lambda: recurrent_module(RNNCell(4), (5, 3)),
        "lstm": lambda: lstm_module(4, (5, 3)),
        "network": lambda: generate_module(load_spec("examples/rnn_classifier.toml")),
        "lstm_network": lambda: generate_module(load_spec("examples/lstm_classifier.toml")),
        # an lstm's sequence into an rnn: two stems, longer function names in the docstrings
        "stacked": lambda: generate_module(parse_spec(SEQUENCE_SPEC.replace("KIND", "lstm").replace(
            '{ type = "flatten", name = "flat" }', '{ type = "rnn", name = "r2", hidden = 5 }'))),
    }
    source = sources[kind]()
    path.write_text(source)
    result = subprocess.run(["ruff", "check", "--no-cache", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_state_gradients_obey_the_tanh_bound():
    """BPTT's ``dh[t-1] = (dh[t] * (1 - h[t]**2)) W_hh`` with ``|1 - h**2| <= 1`` gives
    ``||dL/dh_t|| <= ||W_hh||_2^(T-t) ||dL/dh_T||``: the traced gradients respect it."""
    steps, d, h = 12, 3, 5
    module = load_module(recurrent_module(RNNCell(h), (steps, d)))
    rng = np.random.default_rng(7)
    params = {k: rng.normal(scale=0.5, size=s) for k, s in module.PARAM_SHAPES.items()}
    out, caches = module.forward(rng.normal(size=(4, steps, d)), params)
    trace = []
    module.backward(rng.normal(size=out.shape), caches, params, trace=trace)
    assert len(trace) == steps
    spectral = np.linalg.norm(params["W_hh"], 2)
    last = np.linalg.norm(trace[0])
    for back, grad in enumerate(trace):
        assert np.linalg.norm(grad) <= spectral**back * last * (1 + 1e-12)


def test_vanishing_experiment_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples/experiments/rnn_vanishing.py"
    spec = importlib.util.spec_from_file_location("rnn_vanishing", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    norms = experiment.main(["--steps", "30"])
    out = capsys.readouterr().out
    assert "forget bias 3" in out
    # BPTT's memory: the predicted bytes equal the measured ones on every row
    rows = [line.split() for line in out.split("memory BPTT keeps")[1].splitlines()[2:]]
    assert len(rows) == 3
    for row in rows:
        assert row[1] == row[2] and row[3] == row[4]
    rnn, lstm_kept = norms["rnn (tanh)"], norms["lstm, forget bias 3"]
    # the tanh RNN's gradient 29 steps back is orders of magnitude below the LSTM's whose
    # forget gate stays open (sigmoid(3) = 0.95)
    assert rnn[0] / rnn[-1] < 1e-6 < lstm_kept[0] / lstm_kept[-1]

SEQUENCE_SPEC = """
input = { shape = [6, 4] }
loss = "softmax_cross_entropy"
layers = [
  { type = "KIND", name = "KIND", hidden = 8, sequence = true },
  { type = "flatten", name = "flat" },
  { type = "linear", name = "out", out = 3 },
]
"""


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("sequence", [False, True])
def test_rnn_layer_in_a_network_agrees_with_torch(kind, sequence):
    """``type = "rnn"`` / ``"lstm"`` in a network (examples/rnn_classifier.toml,
    examples/lstm_classifier.toml, and with ``sequence`` flattened into the head): loss and every
    gradient, dx included, as nn.RNN / nn.LSTM + nn.Linear + cross entropy in float64."""
    from symbp.declare.spec import load_spec, parse_spec
    from symbp.emit.module import generate_module

    net = load_spec(f"examples/{kind}_classifier.toml")
    if sequence:
        net = parse_spec(SEQUENCE_SPEC.replace("KIND", kind))
    module = load_module(generate_module(net))
    n, t, d, h = 5, 6, 4, 8
    rng = np.random.default_rng(3)
    params = module.init_params(seed=1)
    for name in TORCH_NAMES:  # init_params leaves the biases 0: PyTorch's uniform init
        params[f"{kind}.{name}"] = rng.uniform(-0.5, 0.5, params[f"{kind}.{name}"].shape)
    x, y = rng.normal(size=(n, t, d)), rng.integers(0, 3, n)
    loss, grads = module.loss_and_grads(params, x, y)
    rnn = (torch.nn.RNN if kind == "rnn" else torch.nn.LSTM)(d, h, batch_first=True).double()
    head = torch.nn.Linear(h * (t if sequence else 1), 3).double()
    with torch.no_grad():
        for name, torch_name in TORCH_NAMES.items():
            getattr(rnn, torch_name).copy_(torch.from_numpy(params[f"{kind}.{name}"]))
        head.weight.copy_(torch.from_numpy(params["out.W"].T))
        head.bias.copy_(torch.from_numpy(params["out.b"]))
    xt = torch.from_numpy(x).requires_grad_(True)
    states, last = rnn(xt)
    last = last[0] if kind == "lstm" else last  # (h_n, c_n)
    features = states.reshape(n, -1) if sequence else last[0]
    expected = torch.nn.functional.cross_entropy(head(features), torch.from_numpy(y))
    expected.backward()
    assert abs(float(loss) - expected.item()) < TOLERANCE
    np.testing.assert_allclose(grads["x"], xt.grad.numpy(), rtol=0, atol=TOLERANCE)
    for name, torch_name in TORCH_NAMES.items():
        np.testing.assert_allclose(grads[f"{kind}.{name}"],
                                   getattr(rnn, torch_name).grad.numpy(), rtol=0,
                                   atol=TOLERANCE, err_msg=name)
    np.testing.assert_allclose(grads["out.W"], head.weight.grad.numpy().T, rtol=0, atol=TOLERANCE)


def test_rnn_layer_check_and_derive(capsys):
    """``symbp check`` passes on the network; ``symbp derive`` prints the cell's derivation
    once (not T copies; dh and dW_hh among its gradients) and says it is applied for
    t = T-1..0, the weights' gradients summed over t."""
    from symbp.cli import main

    assert main(["check", "examples/rnn_classifier.toml"]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert main(["derive", "examples/rnn_classifier.toml"]) == 0
    out = capsys.readouterr().out
    assert out.count("h_new[n, j] = tanh(a[n, j])") == 1  # the cell's forward, once
    assert "dh[n, j] =" in out and "dW_hh[j, j'] =" in out
    assert "applied for t = T-1..0" in " ".join(out.split())
    assert "summed over t" in " ".join(out.split())
