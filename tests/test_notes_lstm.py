"""The study notes of an LSTM: backpropagation through time as the recurrence it is, read off
the derivations of the cell's two parts (the cell state ``c_new``, then ``h_new``).

The rows the notes print for an ``lstm`` layer (the forward recurrence, both states' gradients
at T, the gates' gradients at t, ``dJ/dh_{t-1}`` and ``dJ/dc_{t-1}`` handed to the step before,
the weights' gradients summed over t) are *evaluated* with NumPy, row by row in the order
printed (``tests/test_notes_rnn.py``'s evaluator), and give PyTorch's ``nn.LSTM`` output and
every gradient to 1e-10; the notes compile with pdflatex / parse with KaTeX.
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
from test_notes_rnn import TORCH_NAMES, Rows

from symbp.declare.spec import load_spec, parse_spec
from symbp.derivation.network import derive_network
from symbp.derivation.unrolled import STEPS
from symbp.emit.latex_printer import AtLayer, Delta, Grad
from symbp.emit.notes import _Builder, render_notes
from symbp.emit.notes_nodes import AtStep

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lstm_classifier.toml"
SEQUENCE_SPEC = """
name = "lstm_seq"
input = { shape = [5, 3] }
loss = "mse"

[[layers]]
type = "lstm"
name = "l1"
hidden = 4
sequence = true

[[layers]]
type = "lstm"
name = "l2"
hidden = 4
"""
GATES = "ifgo"


class LSTMRows(Rows):
    """The rnn notes' evaluator, with the sigmoid's ``exp`` and a gradient at step T read
    where a row stored it (``dJ/dc_T`` reads ``dJ/dh_T``)."""

    def value(self, e):
        at_end = e.xreplace({STEPS: sp.Integer(self.steps)})
        if at_end != e and at_end in self.values:
            return self.values[at_end]
        if isinstance(e, sp.exp):
            return np.exp(self.value(e.args[0]))
        return super().value(e)


@pytest.mark.parametrize("spec", ["example", "sequence"])
def test_the_printed_lstm_recurrence_is_bptt(spec):
    """Every lstm layer's printed rows, run in order, are nn.LSTM's forward and backward (the
    gate blocks W_ii, W_if, ... of W_ih stacked back by gate, as PyTorch's weight_ih_l0)."""
    net = load_spec(EXAMPLE) if spec == "example" else parse_spec(SEQUENCE_SPEC)
    derivation = derive_network(net)
    builder = _Builder(derivation, fmt="md", steps=False, notation="d2l")
    layers = [d for d in derivation.layers if d.layer.kind == "lstm"]
    steps, features = net.placed[0].in_shape
    n, rng = 3, np.random.default_rng(1)
    x = rng.standard_normal((n, steps, features))
    params, sizes = [], []
    for derived in layers:
        d, h = derived.placed.in_shape[-1], derived.layer.hidden
        sizes.append((d, h))
        params.append({"W_ih": rng.standard_normal((4 * h, d)) * 0.5,
                       "W_hh": rng.standard_normal((4 * h, h)) * 0.5,
                       "b_ih": rng.standard_normal(4 * h), "b_hh": rng.standard_normal(4 * h)})
    values = {AtStep(AtLayer(sp.Symbol("h"), sp.Symbol("0")), k): x[:, k - 1]
              for k in range(1, steps + 1)}
    for derived, layer in zip(layers, params, strict=True):
        label = sp.Symbol(builder.labels[derived.name])
        for name, value in layer.items():  # PyTorch's stacked rows, by gate i, f, g, o
            for gate, block in zip(GATES, np.split(value, 4), strict=True):
                values[AtLayer(sp.Symbol(f"{name[0]}_{name[2]}{gate}"), label)] = block
    rows = LSTMRows(values, steps)
    for derived in layers:
        rows.run(builder.recurrent_forward(derived))
    top = sp.Symbol(builder.labels[layers[-1].name])
    lstms = []
    for (d, h), layer in zip(sizes, params, strict=True):
        lstm = torch.nn.LSTM(d, h, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            for name, torch_name in TORCH_NAMES.items():
                getattr(lstm, torch_name).copy_(torch.from_numpy(layer[name]))
        lstms.append(lstm)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = xt
    for lstm in lstms:
        states, (last, _) = lstm(out)
        out = states if lstm is not lstms[-1] else last[0]
    np.testing.assert_allclose(rows.values[AtLayer(sp.Symbol("h"), top)], out.detach().numpy(),
                               rtol=0, atol=1e-12)
    g = rng.standard_normal(out.shape)  # L = sum(out * g): the top layer's delta is g
    (out * torch.from_numpy(g)).sum().backward()
    rows.values[Delta(top)] = g
    for derived in reversed(layers):
        rows.run(builder.recurrent_deltas(derived, Delta(sp.Symbol(builder.inputs[derived.name]))))
    for derived, lstm in zip(layers, lstms, strict=True):
        label = sp.Symbol(builder.labels[derived.name])
        for name, torch_name in TORCH_NAMES.items():
            printed = np.concatenate([
                rows.values[Grad(AtLayer(sp.Symbol(f"{name[0]}_{name[2]}{gate}"), label))]
                for gate in GATES])
            np.testing.assert_allclose(printed, getattr(lstm, torch_name).grad.numpy(),
                                       rtol=0, atol=1e-10, err_msg=name)
    dx = np.stack([rows.values[AtStep(Delta(sp.Symbol("0")), k)] for k in range(1, steps + 1)], 1)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=1e-10)


def test_the_lstm_notes_print_both_states_recurrences_and_render(tmp_path):
    """``dJ/dh_{t-1}`` and ``dJ/dc_{t-1}`` each printed once for t = T..2 (not T copies); the
    LaTeX compiles, the Markdown parses with KaTeX."""
    derivation = derive_network(load_spec(EXAMPLE))
    md = render_notes(derivation, fmt="md")
    assert md.count(r"\frac{\partial J}{\partial \mathbf{c}^{(1)}_{t - 1}} &=") == 1
    assert md.count(r"\frac{\partial J}{\partial \mathbf{h}^{(1)}_{t - 1}} &=") == 1
    assert r"\mathbf{c}^{(1)}_{3}" not in md  # the step is t, never a number
    if have_node():
        assert katex_errors(extract_markdown_math(md)) == []
    if have_pdflatex():
        ok, log, _ = compile_latex(render_notes(derivation, fmt="tex"), tmp_path)
        assert ok, log[-3000:]
