"""The study notes of a recurrent network: backpropagation through time as the recurrence it is.

* The rows the notes print for an ``rnn`` layer (the forward recurrence and the delta
  recursion through time, sympy expressions in the network's names) are *evaluated* here with
  NumPy, row by row, in the order printed, and give PyTorch's ``nn.RNN`` output and every
  gradient (``dx``, ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh``) to 1e-10: the notes' recurrence is
  BPTT, not a picture of it.
* The printed text has the textbook recurrence ``dJ/dh_{t-1} = dJ/da_t W_hh`` with
  ``dJ/da_t = dJ/dh_t (1 - h_t^2)`` (tanh' = 1 - tanh^2), the cell's derivation once (never
  a step's number in place of t), and compiles with pdflatex / parses with KaTeX.
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

from symbp.declare.spec import load_spec, parse_spec
from symbp.derivation.array_ops import Dot, Permute, SumOver
from symbp.derivation.network import derive_network
from symbp.derivation.unrolled import STEPS
from symbp.emit.latex_printer import AtLayer, Delta, Grad
from symbp.emit.notes import _Builder, render_notes
from symbp.emit.notes_nodes import AtStep, ForSteps, StepsOf
from symbp.emit.notes_recurrent import STEP

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rnn_classifier.toml"
TORCH_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0", "b_ih": "bias_ih_l0",
               "b_hh": "bias_hh_l0"}
SEQUENCE_SPEC = """
name = "rnn_seq"
input = { shape = [5, 3] }
loss = "mse"

[[layers]]
type = "rnn"
name = "r1"
hidden = 4
sequence = true

[[layers]]
type = "rnn"
name = "r2"
hidden = 4
"""


# -- evaluating the printed rows --------------------------------------------------------------
class Rows:
    """The notes' rows run with NumPy: each ``lhs = rhs`` (``rhs`` for each step ``t`` of a
    :class:`ForSteps`, in the order it gives) stores the value of ``lhs`` at that step."""

    def __init__(self, values: dict, steps: int):
        self.values, self.steps = dict(values), steps

    def run(self, rows) -> None:
        """Consecutive rows over the steps run together, step by step, each at the steps of
        its range (``t = T..1`` and ``t = T..2``: the state's row stops a step early)."""
        group: list = []
        for lhs, rhs in [*rows, (None, None)]:
            if isinstance(rhs, ForSteps):
                group.append((lhs, rhs))
                continue
            self._steps(group)
            group = []
            if lhs is not None:
                self.values[lhs.xreplace({STEPS: self.steps})] = self.value(rhs)

    def _steps(self, group) -> None:
        if not group:
            return
        ranges = [tuple(self._number(v) for v in rhs.args[2:]) for _, rhs in group]
        first = ranges[0][0]
        step = 1 if ranges[0][1] >= first else -1
        end = max(r[1] for r in ranges) if step == 1 else min(r[1] for r in ranges)
        for k in range(first, end + step, step):
            for (lhs, rhs), (low, high) in zip(group, ranges, strict=True):
                if min(low, high) <= k <= max(low, high):
                    expr = rhs.args[0].xreplace({STEP: k})
                    self.values[lhs.xreplace({STEP: k})] = self.value(expr)

    def _number(self, v) -> int:
        return int(v.subs(STEPS, self.steps))

    def value(self, e):
        if e in self.values:
            return self.values[e]
        if isinstance(e, AtStep):  # a step number is an integer expression in t and T
            at = e.args[1].subs(STEPS, self.steps)
            if at != e.args[1]:
                return self.value(AtStep(e.args[0], at))
        if e.is_Integer or e.is_Rational:
            return float(e)
        if isinstance(e, sp.Add):
            return sum(self.value(a) for a in e.args)
        if isinstance(e, sp.Mul):
            out = 1.0
            for a in e.args:
                out = out * self.value(a)
            return out
        if isinstance(e, sp.Pow):
            return self.value(e.base) ** float(e.exp)
        if isinstance(e, sp.tanh):
            return np.tanh(self.value(e.args[0]))
        if isinstance(e, Dot):
            left, right = (self.value(a) for a in e.args)
            if np.ndim(left) == 0:  # a zero state (h_0 = 0): zero rows, broadcast
                return left * right[0]
            if np.ndim(right) == 0:  # ... and zero columns
                return left[:, :1] * right
            return left @ right
        if isinstance(e, Permute):
            return self.value(e.args[0]).T
        if isinstance(e, SumOver):
            return self.value(e.args[0]).sum(axis=tuple(int(a) for a in e.args[1]))
        if isinstance(e, sp.Sum):
            (t, first, last), = e.limits
            last = int(last.subs(STEPS, self.steps))
            return sum(self.value(e.function.xreplace({t: k})) for k in range(int(first), last + 1))
        if isinstance(e, StepsOf):
            node = e.args[0]
            return np.stack([self.value(AtStep(node, k)) for k in range(1, self.steps + 1)], 1)
        raise KeyError(f"no value for {e}")


def _torch_rnns(sizes, params):
    rnns = []
    for (d, h), layer in zip(sizes, params, strict=True):
        rnn = torch.nn.RNN(d, h, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            for name, torch_name in TORCH_NAMES.items():
                getattr(rnn, torch_name).copy_(torch.from_numpy(layer[name]))
        rnns.append(rnn)
    return rnns


@pytest.mark.parametrize("spec", ["example", "sequence"])
def test_the_printed_recurrence_is_bptt(spec):
    """Every rnn layer's printed rows, run in order, are PyTorch's forward and backward."""
    net = load_spec(EXAMPLE) if spec == "example" else parse_spec(SEQUENCE_SPEC)
    derivation = derive_network(net)
    builder = _Builder(derivation, fmt="md", steps=False, notation="d2l")
    rnn_layers = [d for d in derivation.layers if d.layer.kind == "rnn"]
    steps, features = net.placed[0].in_shape
    n, rng = 3, np.random.default_rng(1)
    x = rng.standard_normal((n, steps, features))
    params, sizes = [], []
    for derived in rnn_layers:
        d, h = derived.placed.in_shape[-1], derived.layer.hidden
        sizes.append((d, h))
        params.append({"W_ih": rng.standard_normal((h, d)) * 0.5,
                       "W_hh": rng.standard_normal((h, h)) * 0.5,
                       "b_ih": rng.standard_normal(h), "b_hh": rng.standard_normal(h)})
    values = {AtStep(AtLayer(sp.Symbol("h"), sp.Symbol("0")), k): x[:, k - 1]
              for k in range(1, steps + 1)}
    for derived, layer in zip(rnn_layers, params, strict=True):
        label = sp.Symbol(builder.labels[derived.name])
        values.update({AtLayer(sp.Symbol(name), label): value for name, value in layer.items()})
    rows = Rows(values, steps)
    for derived in rnn_layers:
        rows.run(builder.recurrent_forward(derived))
    top = sp.Symbol(builder.labels[rnn_layers[-1].name])
    # torch's forward
    rnns = _torch_rnns(sizes, params)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = xt
    for rnn in rnns:
        states, last = rnn(out)
        out = states if rnn is not rnns[-1] else last[0]
    np.testing.assert_allclose(rows.values[AtLayer(sp.Symbol("h"), top)], out.detach().numpy(),
                               rtol=0, atol=1e-12)
    # backward from L = sum(out * g): the notes' delta at the top layer is g
    g = rng.standard_normal(out.shape)
    (out * torch.from_numpy(g)).sum().backward()
    rows.values[Delta(top)] = g
    for derived in reversed(rnn_layers):
        target = Delta(sp.Symbol(builder.inputs[derived.name]))
        rows.run(builder.recurrent_deltas(derived, target))
    for derived, rnn in zip(rnn_layers, rnns, strict=True):
        label = sp.Symbol(builder.labels[derived.name])
        for name, torch_name in TORCH_NAMES.items():
            printed = rows.values[Grad(AtLayer(sp.Symbol(name), label))]
            np.testing.assert_allclose(printed, getattr(rnn, torch_name).grad.numpy(),
                                       rtol=0, atol=1e-10)
    dx = np.stack([rows.values[AtStep(Delta(sp.Symbol("0")), k)] for k in range(1, steps + 1)], 1)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=1e-10)


# -- the printed text ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_notes():
    derivation = derive_network(load_spec(EXAMPLE))
    return {fmt: render_notes(derivation, fmt=fmt) for fmt in ("md", "tex")}


@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_notes_print_bptt_as_a_recurrence(example_notes, fmt):
    text = example_notes[fmt]
    da = r"\frac{\partial J}{\partial \mathbf{a}^{(1)}_{t}}"
    dh = r"\frac{\partial J}{\partial \mathbf{h}^{(1)}_{t}}"
    w_hh = r"\mathbf{W_{\mathrm{hh}}}^{(1)}"
    # tanh' = 1 - tanh^2, in the state the forward pass keeps
    assert (rf"{da} &= {dh} \odot \left(1 - \left(\mathbf{{h}}^{{(1)}}_{{t}}\right)^{{\odot 2}}"
            r"\right), \qquad t = T, \dots, 1") in text
    # the state's gradient handed to the step before, through W_hh
    assert (rf"\frac{{\partial J}}{{\partial \mathbf{{h}}^{{(1)}}_{{t - 1}}}} &= {da} {w_hh}, "
            r"\qquad t = T, \dots, 2") in text
    # the last state's gradient is the layer's delta; the weights' gradients are sums over t
    assert (r"\frac{\partial J}{\partial \mathbf{h}^{(1)}_{T}} &= \boldsymbol{\delta}^{(1)}"
            in text)
    assert (rf"\frac{{\partial J}}{{\partial {w_hh}}} &= \sum_{{t=1}}^{{T}} \left({da}\right)"
            r"^{\top} \mathbf{h}^{(1)}_{t - 1}") in text
    assert (r"\mathbf{h}^{(1)}_{t} &= \tanh{\left(\mathbf{a}^{(1)}_{t} \right)}, \qquad "
            r"t = 1, \dots, T") in text
    # the cell's derivation once, never a step's number: no h_2, no T copies
    assert text.count(r"\frac{\partial J}{\partial a_{nj}}") == 1
    assert r"\mathbf{h}^{(1)}_{2}" not in text and "cannot print" not in text
    # an array with a subscript of its own gets its element's indices without a double one
    assert r"\left(W_{\mathrm{hh}}\right)_{ji}" in text and r"W_{\mathrm{hh}}_" not in text


@pytest.mark.skipif(not have_pdflatex(), reason="pdflatex missing: .ci/install_render_tools.sh")
@pytest.mark.parametrize("notation", ["d2l", "cs231n"])
def test_rnn_notes_compile(notation, tmp_path):
    for net in (load_spec(EXAMPLE), parse_spec(SEQUENCE_SPEC)):
        tex = render_notes(derive_network(net), fmt="tex", notation=notation,
                           steps=notation == "cs231n")
        ok, log, _ = compile_latex(tex, tmp_path)
        assert ok, log[-3000:]


@pytest.mark.skipif(not have_node(), reason="node missing: .ci/install_render_tools.sh")
def test_rnn_notes_parse_with_katex():
    for net in (load_spec(EXAMPLE), parse_spec(SEQUENCE_SPEC)):
        for notation in ("d2l", "cs231n"):
            md = render_notes(derive_network(net), fmt="md", notation=notation, steps=True)
            assert katex_errors(extract_markdown_math(md)) == []


def test_cli_writes_rnn_notes(tmp_path):
    from symbp.cli import main

    target = tmp_path / "rnn.md"
    assert main(["latex", str(EXAMPLE), "-o", str(target)]) == 0
    assert r"t = T, \dots, 1" in target.read_text(encoding="utf-8")


def test_flow_section_of_rnn_notes(tmp_path):
    """``--flow``: the rnn's bound from its cell's stages, a sum of powers of ``||W_hh||_2``
    (a subscripted weight's norm printed without a double subscript) that compiles."""
    from symbp.flow import flow_bounds

    derivation = derive_network(load_spec(EXAMPLE))
    rows = flow_bounds(derivation)
    md = render_notes(derivation, fmt="md", flow=rows)
    assert (r"\sum_{k=0}^{5} \lVert \left(W_{\mathrm{hh}}\right)_{\mathrm{rnn}} \rVert_2^{k}"
            in md)
    assert "runs its cell over the $T$ time steps" in md
    if have_node():
        assert katex_errors(extract_markdown_math(md)) == []
    if have_pdflatex():
        ok, log, _ = compile_latex(render_notes(derivation, fmt="tex", flow=rows), tmp_path)
        assert ok, log[-3000:]
