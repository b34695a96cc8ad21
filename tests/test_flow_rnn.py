"""``symbp flow`` on a recurrent net: the proved bound on ``||d h_T / d h_t||`` over t, the
measured norms, and what backpropagation through time keeps.

The bound is derived from the cell's stages (``a <- h``: ``||W_hh||_2``; ``h_new <- a``:
``sup |tanh'| = 1``, proved by calculus), not typed: a cell with a sigmoid in place of tanh gets
``||W_hh||_2 / 4`` from the same code. At random weights, small and large, every measured
``||dL/dh_t||`` (the generated cell backward, checked against PyTorch autograd) is within
``||W_hh||_2^(T-t) ||dL/dh_T||``, with ``||W_hh||_2`` computed by NumPy's SVD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from symbp.checking.gradcheck import load_module
from symbp.declare.forms import Array, Forward, N, Stage, index
from symbp.declare.recurrent import CELL_LETTERS, HIDDEN, D, RNNCell
from symbp.declare.spec import load_spec
from symbp.derivation.layer import derive_layer
from symbp.derivation.network import derive_network
from symbp.derivation.unrolled import STEPS
from symbp.emit.module import function_stems, generate_module
from symbp.flow import OperatorNorm
from symbp.flow.chain import flow_bounds
from symbp.flow.numeric import measure
from symbp.flow.recurrent import _reach, over_time, recurrent_bound, stage_edges, state_gradients

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rnn_classifier.toml"


@pytest.fixture(scope="module")
def example():
    net = load_spec(EXAMPLE)
    return net, derive_network(net), load_module(generate_module(net))


def test_the_bound_comes_from_the_cells_derived_stages(example):
    _, derivation, _ = example
    found = recurrent_bound(derivation.layer("rnn"))
    assert found.states == ("h",) and found.steps == 6
    w_hh = OperatorNorm(sp.Symbol("W_hh"), sp.Symbol("rnn"))
    assert found.per_step == w_hh
    assert found.step_input == OperatorNorm(sp.Symbol("W_ih"), sp.Symbol("rnn"))
    edges = {(stage, source): jac for stage, source, jac in found.edges}
    tanh = edges[("h_new", "a")]
    assert tanh.structure == "diagonal" and tanh.supremum.value == 1  # sup |1 - tanh^2| = 1
    assert found.lag_bound(3) == w_hh**3


class SigmoidCell(RNNCell):
    """The tanh cell with a sigmoid: ``h_new = 1/(1 + exp(-a))``, for the test only."""

    def forward_form(self, in_shape=None):
        tanh = super().forward_form(in_shape)
        n, j = index("n"), index("j")
        a = tanh.stages[0].array
        stages = (tanh.stages[0],
                  Stage(Array("h_new", (N, HIDDEN)), (n, j), 1 / (1 + sp.exp(-a[n, j]))))
        return Forward(inputs=tanh.inputs, params=tanh.params, stages=stages,
                       letters=CELL_LETTERS, through=("a",), keep=("x", "h", "h_new"))


def test_another_activation_gets_its_own_proved_bound():
    """Nothing knows tanh: sup sigmoid' = 1/4 gives ||W_hh||_2 / 4 per step."""
    cell = SigmoidCell(3)
    derived = derive_layer(cell.forward_form((5, 2)))
    edges = stage_edges(cell, derived, "rnn")
    per_step = _reach(derived.form, edges, "h")["h_new"]
    assert per_step == OperatorNorm(sp.Symbol("W_hh"), sp.Symbol("rnn")) / 4


def _torch_state_gradients(x, params, g):
    """``dL/dh_t`` for ``L = sum(h_T * g)`` by autograd through ``nn.RNNCell``."""
    cell = torch.nn.RNNCell(x.shape[2], params["W_hh"].shape[0], dtype=torch.float64)
    with torch.no_grad():
        for name, torch_name in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
            getattr(cell, torch_name).copy_(torch.from_numpy(params[name]))
    h = torch.zeros(x.shape[0], params["W_hh"].shape[0], dtype=torch.float64)
    states = []
    for t in range(x.shape[1]):
        h = cell(torch.from_numpy(x[:, t]), h)
        h.retain_grad()
        states.append(h)
    (h * torch.from_numpy(g)).sum().backward()
    return [s.grad.numpy() for s in reversed(states)]


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_measured_norms_obey_the_bound_at_random_weights(example, scale, seed):
    net, derivation, module = example
    rng = np.random.default_rng(seed)
    params = {key: scale * rng.standard_normal(value.shape)
              for key, value in module.init_params(seed=seed, dtype=np.float64).items()}
    x = rng.standard_normal((7, 6, 4))
    _, cache = module.forward(params, x, train=True, rng=rng)
    g = rng.standard_normal((7, 8))
    item = derivation.layer("rnn")
    values = {p.name: params[f"rnn.{p.name}"] for p in item.derivation.form.params}
    measured = state_gradients(module, function_stems(net)["rnn"], item.derivation,
                               cache["rnn"], values, g)
    expected = _torch_state_gradients(x, {k[4:]: v for k, v in params.items()
                                          if k.startswith("rnn.")}, g)
    for ours, theirs in zip(measured, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    norm = np.linalg.svd(params["rnn.W_hh"], compute_uv=False)[0]
    for lag, gradient in enumerate(measured):
        assert np.linalg.norm(gradient) <= norm**lag * np.linalg.norm(g) * (1 + 1e-12)


def test_over_time_is_the_numpy_norm_power_and_bptt_memory(example):
    net, derivation, module = example
    (result,) = over_time(net, derivation, batch=32, seed=0, module=module)
    params = module.init_params(seed=0, dtype=np.float64)
    norm = np.linalg.norm(params["rnn.W_hh"], 2)
    assert len(result.measured) == 6
    np.testing.assert_allclose(result.proved, [norm**k * result.measured[0] for k in range(6)],
                               rtol=1e-12)
    assert all(m <= b * (1 + 1e-12) for m, b in zip(result.measured, result.proved, strict=True))
    # x[t] per step and the T + 1 states h[0..T] once (h[t-1] and h[t] are views of them):
    # N*(T*D + (T + 1)*H) float64, N = 32, T = 6, D = 4, H = 8
    assert sp.simplify(result.formula - N * (STEPS * D + (STEPS + 1) * HIDDEN)) == 0
    assert result.predicted == result.measured_bytes == 32 * (6 * 4 + 7 * 8) * 8


def test_layer_bound_covers_the_measured_jacobian(example):
    """The bound on the whole layer's Jacobian (all steps) is at least its largest singular
    value, at the initial weights and at weights three times as large."""
    net, derivation, module = example
    rows = flow_bounds(derivation)
    assert rows[0].bound is not None and rows[0].product is not None
    params = {k: 3 * v for k, v in module.init_params(seed=0, dtype=np.float64).items()}
    for chosen in (None, params):
        measured = measure(net, rows, batch=8, seed=0, jacobian_batch=2, module=module,
                           params=chosen)
        first = measured.rows[0]
        assert first.jacobian[0] <= first.jacobian_bound * (1 + 1e-12)
        assert first.chain[0] <= first.chain_bound * (1 + 1e-12)


def test_cli_flow_on_a_recurrent_net(capsys):
    from symbp.cli import main

    assert main(["flow", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "||dL/dh_t|| <= ||rnn.W_hh||_2**(T - t) * ||dL/dh_T||" in out
    assert "h_new <- a: sup|f'| = 1" in out
    table = out[out.index("rnn over time"):]
    rows = [line.split() for line in table.splitlines()[3:9]]
    assert [int(r[0]) for r in rows] == [6, 5, 4, 3, 2, 1]
    assert all(float(r[2]) <= float(r[3]) for r in rows)
    assert "BPTT keeps N*(D*T + H*T + H) elements" in out and "DIFFERS" not in out
    assert "no bound found" not in out


def test_an_lstm_state_step_is_bounded_where_it_can_be_and_said_where_not():
    """The LSTM's cell-state step: each gate's ``z <- h`` is a matrix (``||W_h<g>||_2``);
    ``c_new`` multiplies several arrays of the step, whose sup the analysis does not seek
    (it said so at once, where sympy's search ran for minutes): no bound over the step."""
    from symbp.declare.recurrent import LSTMState

    cell = LSTMState(3)
    derived = derive_layer(cell.forward_form((5, 2)))
    edges = stage_edges(cell, derived, "lstm")
    for gate in "ifg":
        assert edges[(f"z{gate}", "h")].bound == OperatorNorm(sp.Symbol(f"W_h{gate}"),
                                                             sp.Symbol("lstm"))
    assert edges[("c_new", "c")].bound is None
    assert "no bound sought" in edges[("c_new", "c")].reason
    assert _reach(derived.form, edges, "c").get("c_new") is None


def test_lstm_flow_measures_the_norms_over_t_and_its_memory(capsys):
    """lstm: no proved bound (said in one line), the norms over t measured by the parts'
    generated backward, each ``dL/dh_t`` (``c``'s gradient 0 at T) equal to autograd's through
    ``nn.LSTMCell`` at random weights; BPTT keeps the input's steps, each state once as
    ``(T + 1, N, H)`` and the four gates' pre-activations per step:
    ``N*(T*D + 2*(T + 1)*H + 4*T*H)`` float64 values, predicted and measured."""
    from symbp.cli import main

    path = EXAMPLE.parent / "lstm_classifier.toml"
    net = load_spec(path)
    derivation, module = derive_network(net), load_module(generate_module(net))
    rng = np.random.default_rng(2)
    params = {k: 0.7 * rng.standard_normal(v.shape) for k, v in module.init_params(0).items()}
    x, g = rng.standard_normal((5, 6, 4)), rng.standard_normal((5, 8))
    _, cache = module.forward(params, x, train=True, rng=rng)
    values = {k[5:]: v for k, v in params.items() if k.startswith("lstm.")}
    measured = state_gradients(module, function_stems(net)["lstm"],
                               derivation.layer("lstm").derivation, cache["lstm"], values, g)
    cell = torch.nn.LSTMCell(4, 8, dtype=torch.float64)
    with torch.no_grad():
        for name, torch_name in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
            getattr(cell, torch_name).copy_(torch.from_numpy(values[name]))
    h = c = torch.zeros(5, 8, dtype=torch.float64)
    states = []
    for t in range(6):
        h, c = cell(torch.from_numpy(x[:, t]), (h, c))
        h.retain_grad()
        states.append(h)
    (h * torch.from_numpy(g)).sum().backward()
    for ours, theirs in zip(measured, [s.grad.numpy() for s in reversed(states)], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    (result,) = over_time(net, derivation, batch=32, seed=0, module=module)
    assert result.per_step is None and result.proved == [None] * 6
    assert sp.simplify(result.formula - N * (STEPS * D + 2 * (STEPS + 1) * HIDDEN
                                             + 4 * STEPS * HIDDEN)) == 0
    assert result.predicted == result.measured_bytes == 32 * (6 * 4 + 2 * 7 * 8 + 4 * 6 * 8) * 8
    assert main(["flow", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no bound sought: lstm's step multiplies arrays of the step" in out
    assert "lstm over time" in out and "DIFFERS" not in out
