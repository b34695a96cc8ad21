"""``symbp graph``: the computational graph drawn from the network plan.

The expected structure comes from examples/two_branch.toml read by hand (its comment: x is read
twice, enc three times, and the split halves both read join); the numbers on the edges are
checked against the generated module's own ``forward``/``loss_and_grads`` and a NumPy
computation of the first layers, not against the sweep the drawing uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from render.tools import compile_latex, have_pdflatex

from symbp.checking.example import run_example
from symbp.checking.gradcheck import load_module, make_inputs
from symbp.cli import main
from symbp.declare.spec import load_spec
from symbp.derivation.plan import build_plan
from symbp.emit.drawing import build_drawing, render_dot, render_tikz, summary
from symbp.emit.module import generate_module

SPEC = Path(__file__).resolve().parent.parent / "examples" / "two_branch.toml"
#: two_branch's steps (flatten named by its position) and what each reads, from the spec
READS = {
    "t": ["x"], "mix": ["x", "t"], "flatten3": ["mix"], "enc": ["flatten3"], "a": ["enc"],
    "mid": ["a"], "b": ["enc"], "tied": ["b"], "join": ["mid", "tied"], "halves.0": ["join"],
    "halves.1": ["join"], "gate": ["halves.0"], "signal": ["halves.1"],
    "gtu": ["signal", "gate"], "cat": ["gtu", "enc"], "out": ["cat"],
}
FAN_OUT = {"x": 2, "enc": 3, "join": 2}


@pytest.fixture(scope="module")
def net():
    return load_spec(SPEC)


def _parse(dot: str):
    labels = dict(re.findall(r"^  (\w+) \[.*?label=<(?:<b>)?([^<>]*)", dot, re.M))
    edges = re.findall(r"^  (\w+) -> (\w+)", dot, re.M)
    return labels, edges


def test_dot_has_a_node_per_step_an_edge_per_read_and_the_fan_outs(net):
    dot = render_dot(build_drawing(build_plan(net)))
    labels, edges = _parse(dot)
    steps = {node: name for node, name in labels.items() if node.startswith("s")}
    assert sorted(steps.values()) == sorted(READS)
    sums = [node for node in re.findall(r"^  (\w+) \[shape=circle", dot, re.M)]
    assert len(sums) == len(FAN_OUT)

    def value_of(node):  # what a node hands on: its step's output, an input, a fan-out's value
        if node in sums:
            return value_of(next(t for t, h in edges if h == node))
        return labels[node]

    for node, name in steps.items():
        read = [value_of(t) for t, h in edges if h == node]
        assert read == READS[name], name
    for node in sums:
        value = value_of(node)
        assert sum(1 for t, _ in edges if t == node) == FAN_OUT[value]
    assert sum(1 for _, h in edges if h in steps) == sum(len(r) for r in READS.values())
    assert ("s15", "loss") in edges  # out -> the loss


def test_parameters_drawn_once_and_shared_ones_marked(net):
    dot = render_dot(build_drawing(build_plan(net), params=True))
    labels, edges = _parse(dot)
    params = {node: key for node, key in labels.items() if node.startswith("p")}
    assert sorted(params.values()) == ["enc.W", "enc.b", "mid.W", "mid.b", "out.W", "out.b"]
    mid = next(node for node, key in params.items() if key == "mid.W")
    assert sorted(labels[h] for t, h in edges if t == mid) == ["mid", "tied"]
    assert "shared: Σ of grads" in dot


@pytest.fixture(scope="module")
def example(net):
    module = load_module(generate_module(net))
    params, x, y = make_inputs(net, module, batch=1, seed=3)
    drawing = build_drawing(build_plan(net), params=True, example=run_example(net, seed=3))
    return module, params, x, y, drawing


def test_numbers_on_the_edges_are_the_modules_values_and_gradients(example):
    module, params, x, y, drawing = example
    loss, grads = module.loss_and_grads(params, x, y)
    out, _ = module.forward(params, x)
    by_pair = {(e.tail, e.head): e for e in drawing.edges}
    names = {n.id: n.lines[0] for n in drawing.nodes}
    into_loss = by_pair[("s15", "loss")]
    np.testing.assert_allclose(into_loss.forward, out[0], rtol=1e-12)
    assert drawing.node("loss").lines[-1] == f"L = {float(loss):.3g}"
    # x -> its fan-out: x itself and the whole dL/dx; the parts handed back by t and mix sum to it
    x_edge = by_pair[("in0", "sum0")]
    np.testing.assert_allclose(x_edge.forward, x[0], rtol=1e-12)
    np.testing.assert_allclose(x_edge.backward, grads["x"][0], rtol=1e-10, atol=1e-14)
    parts = [e.backward for e in drawing.edges if e.tail == "sum0"]
    np.testing.assert_allclose(sum(parts), grads["x"][0], rtol=1e-10, atol=1e-14)
    # enc's output by hand: flatten(x @ tanh(x)) @ W + b
    enc = (x[0] @ np.tanh(x[0])).reshape(-1) @ params["enc.W"] + params["enc.b"]
    enc_edge = next(e for e in drawing.edges if names[e.tail] == "enc")
    np.testing.assert_allclose(enc_edge.forward, enc, rtol=1e-12)
    # a shared parameter's parts (mid, tied) sum to the module's gradient; the others equal it
    for key in ("mid.W", "enc.W", "out.b"):
        node = next(n.id for n in drawing.nodes if n.role == "param" and n.lines[0] == key)
        total = sum(e.backward for e in drawing.edges if e.tail == node)
        np.testing.assert_allclose(total, grads[key], rtol=1e-10, atol=1e-14)
    assert summary(np.array([0.5, -2.0])) == "[0.5 -2]"
    assert summary(np.array([3.0, 4.0, 0.0, 0.0])) == "norm 5"


def test_annotated_dot_and_tikz_carry_the_numbers(example):
    drawing = example[4]
    edge = next(e for e in drawing.edges if e.head == "loss")
    dot, tikz = render_dot(drawing), render_tikz(drawing)
    for text in (dot, tikz):
        assert edge.forward_text in text and edge.backward_text in text
    assert 'color="darkgreen"' in dot and 'color="red"' in dot


def _have_tikz() -> bool:
    kpsewhich = shutil.which("kpsewhich")
    return bool(kpsewhich) and bool(
        subprocess.run([kpsewhich, "tikz.sty"], capture_output=True, text=True).stdout.strip()
    )


@pytest.mark.skipif(not (have_pdflatex() and _have_tikz()), reason="pdflatex or TikZ missing")
def test_tikz_and_notes_with_the_graph_compile(example, tmp_path, net):
    ok, log, _ = compile_latex(render_tikz(example[4]), tmp_path / "graph")
    assert ok, log[-3000:]
    notes = tmp_path / "notes.tex"
    assert main(["latex", str(SPEC), "--graph", "-o", str(notes)]) == 0
    ok, log, _ = compile_latex(notes.read_text(), tmp_path / "notes")
    assert ok, log[-3000:]


def test_notes_include_the_figure(tmp_path):
    notes = tmp_path / "notes.tex"
    assert main(["latex", str(SPEC), "--graph", "-o", str(notes)]) == 0
    text = notes.read_text()
    assert "\\usepackage{tikz}" in text and "\\begin{tikzpicture}" in text
    assert main(["latex", str(SPEC), "-o", str(tmp_path / "plain.tex")]) == 0
    assert "tikz" not in (tmp_path / "plain.tex").read_text()


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot missing")
def test_svg_renders(tmp_path):
    pytest.importorskip("graphviz")
    svg = tmp_path / "g.svg"
    assert main(["graph", str(SPEC), "--example", "--params", "-o", str(svg)]) == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert ">enc<" in text and ">Σ<" in text


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["graph", str(SPEC), "-o", str(tmp_path / "g.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".svg" in err
    assert main(["latex", str(SPEC), "--graph", "-o", str(tmp_path / "n.md")]) == 2
    assert "LaTeX notes only" in capsys.readouterr().err
    assert main(["graph", str(tmp_path / "missing.toml"), "-o", str(tmp_path / "g.dot")]) == 2
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "graphviz", None)  # the extra not installed
    assert main(["graph", str(SPEC), "-o", str(tmp_path / "g.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install graphviz" in err and "symbp[graph]" in err
    assert main(["graph", str(SPEC), "-o", str(tmp_path / "g.dot")]) == 0  # needs neither
    assert main(["graph", str(SPEC), "-o", str(tmp_path / "g.tex")]) == 0
