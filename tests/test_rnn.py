"""Recurrent networks and backpropagation through time (issue 25, part 3).

* the tanh cell (one time step) is declared as index-notation stages and its VJPs derived by the
  engine, proved against direct differentiation at small sizes;
* the generated module runs the derived cell over time and backwards over time (BPTT), and
  agrees with ``nn.RNN(batch_first=True)`` in float64 to 1e-10: the output and every gradient
  (dx included), the last state and the whole sequence.
"""

from __future__ import annotations

import numpy as np
import pytest

from symbp.checking.gradcheck import load_module
from symbp.declare.forms import N
from symbp.declare.recurrent import HIDDEN, D, RNNCell
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import verify_layer
from symbp.emit.recurrent import recurrent_module

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
    which is dh_new * (1 - tanh(a)**2): the engine's, not typed anywhere."""
    derivation = derive_layer(RNNCell(2).forward_form())
    text = str(derivation.vjp["h"].expr)
    assert "W_hh" in text and "da" in text
    assert "tanh" in str(derivation.through["a"].expr)


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize(("n", "t", "d", "h"), [(3, 5, 4, 6), (1, 1, 2, 3), (2, 7, 1, 1)])
def test_rnn_agrees_with_torch(sequence, n, t, d, h):
    module = load_module(recurrent_module(RNNCell(h), (t, d)))
    rng = np.random.default_rng(n * 100 + t * 10 + d)
    x = rng.normal(size=(n, t, d))
    params = {k: rng.normal(scale=0.6, size=s) for k, s in module.PARAM_SHAPES.items()}
    out, caches = module.forward(x, params, sequence=sequence)
    dout = rng.normal(size=out.shape)
    dx, grads = module.backward(dout, caches, params, sequence=sequence)

    rnn = torch.nn.RNN(d, h, batch_first=True).double()
    with torch.no_grad():
        for name, torch_name in TORCH_NAMES.items():
            getattr(rnn, torch_name).copy_(torch.from_numpy(params[name]))
    xt = torch.from_numpy(x).requires_grad_()
    states, last = rnn(xt)
    expected = states if sequence else last[0]
    (expected * torch.from_numpy(dout)).sum().backward()

    assert out.shape == tuple(expected.shape)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=TOLERANCE)
    for name, torch_name in TORCH_NAMES.items():
        np.testing.assert_allclose(grads[name], getattr(rnn, torch_name).grad.numpy(),
                                   rtol=0, atol=TOLERANCE, err_msg=name)


def test_generated_module_is_lint_clean(tmp_path):
    ruff = pytest.importorskip("ruff")
    del ruff
    import subprocess
    import sys

    path = tmp_path / "rnn_module.py"
    path.write_text(recurrent_module(RNNCell(4), (5, 3)))
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
