"""``type = "lstm"`` as a network layer (issue 25, part 3): a cell of two derived parts and two
states unrolled over time, through the same hook, derivation and template as ``rnn``.

Agreement with ``nn.LSTM`` in a network (float64, 1e-10, last state and whole sequence, dx and
every weight) is in tests/test_rnn.py (``test_rnn_layer_in_a_network_agrees_with_torch``), with
the refusals of the torch/JAX targets and the notes; here: ``check``, ``derive`` (each part once
and BPTT as the textbook recurrence, compared with it by sympy), ``derive --verify``, the memory
BPTT keeps (predicted = measured), and bad fields (one line, exit 2).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from symbp import cli
from symbp.declare.spec import load_spec, parse_spec
from symbp.derivation.network import derive_network
from symbp.derivation.unrolled import TIME, recurrence
from symbp.flow.memory import measure_cache, memory_model, predicted_bytes

LSTM = "examples/lstm_classifier.toml"


def _lines(kind: str) -> dict[str, sp.Expr]:
    net = load_spec(f"examples/{kind}_classifier.toml")
    layer = derive_network(net).layer(kind).derivation
    return {lhs.base.name + ("[t-1]" if lhs.indices[0] == TIME - 1 else "[t]"): (lhs, rhs)
            for lhs, rhs in recurrence(layer)}


def _at(name, step, *indices):
    return sp.IndexedBase(name, real=True)[(step, *indices)]


def test_rnn_recurrence_is_the_textbook_one():
    """dh[t-1] = W_hh^T (dh[t] * (1 - h[t]**2)) (Elman's BPTT), once da[t] is put in."""
    lines = _lines("rnn")
    (dh_lhs, dh), (da_lhs, da) = lines["dh[t-1]"], lines["da[t]"]
    t, (n, j) = TIME, dh_lhs.indices[1:]
    assert isinstance(dh, sp.Sum) and da_lhs == _at("da", t, n, j)
    (k, _, top), term = dh.limits[0], dh.function
    assert top == sp.Symbol("H", integer=True, positive=True) - 1
    term = term.xreplace({_at("da", t, n, k): da.xreplace({j: k})})
    hand = (sp.IndexedBase("W_hh", real=True)[k, j] * _at("dh", t, n, k)
            * (1 - _at("h", t, n, k) ** 2))
    assert sp.expand(term - hand) == 0


def test_lstm_cell_state_recurrence_is_the_textbook_one():
    """dc[t-1] = dc[t]*f[t] + dh[t-1]*o[t-1]*(1 - tanh(c[t-1])**2), f and o the forget and
    output gates (sigmoids of zf, zo): what every LSTM text derives by hand."""
    lines = _lines("lstm")
    lhs, dc = lines["dc[t-1]"]
    t, (n, j) = TIME, lhs.indices[1:]
    gate = lambda z, step: 1 / (1 + sp.exp(-_at(z, step, n, j)))  # noqa: E731
    hand = (_at("dc", t, n, j) * gate("zf", t) + _at("dh", t - 1, n, j) * gate("zo", t - 1)
            * (1 - sp.tanh(_at("c", t - 1, n, j)) ** 2))
    assert sp.simplify(dc - hand) == 0
    # dh[t-1] reads every gate's gradient at t through its block of W_hh
    _, dh = lines["dh[t-1]"]
    for gate_name in "ifgo":
        assert f"W_h{gate_name}" in str(dh) and f"dz{gate_name}[t, n, k]" in str(dh)


def test_lstm_check_and_derive(capsys):
    """``symbp check`` passes; ``symbp derive`` prints each part's forward once (not T copies)
    and the recurrence lines dh[t - 1], dc[t - 1], dx[t]; ``derive --verify`` proves both
    parts."""
    assert cli.main(["check", LSTM]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert cli.main(["derive", "--ascii", LSTM]) == 0
    out = capsys.readouterr().out
    starts = [line.strip().split(" =")[0] for line in out.splitlines()]
    assert starts.count("c_new[n, j]") == 1 and starts.count("h_new[n, j]") == 1
    flat = " ".join(out.split())
    for line in ("dh[t - 1, n, j] =", "dc[t - 1, n, j] =", "dx[t, n, d] ="):
        assert line in out, line
    assert "applied for t = T-1..0" in flat and "summed over t" in flat
    assert "W_ii, W_if, W_ig, W_io: the blocks of rows of W_ih" in flat
    assert cli.main(["derive", "--verify", LSTM]) == 0
    out = capsys.readouterr().out
    assert "c_new part dh" in out and "h_new part dc_new" in out
    assert "proven equal" in out and "NOT" not in out


SEQUENCE = """
input = { shape = [5, 3] }
loss = "mse"
layers = [
  { type = "KIND", name = "KIND", hidden = 4, sequence = true },
  { type = "flatten", name = "flat" },
  { type = "linear", name = "out", out = 2 },
]
"""


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("sequence", [False, True])
def test_memory_predicted_is_measured(kind, sequence):
    """What BPTT keeps: the states once ((T + 1) N H each, h[t-1] and h[t] views of one array),
    the LSTM's four gates (4 T N H), the input; the formula equals the bytes of the cache."""
    from symbp.checking.gradcheck import load_module
    from symbp.emit.module import generate_module

    net = (parse_spec(SEQUENCE.replace("KIND", kind)) if sequence
           else load_spec(f"examples/{kind}_classifier.toml"))
    module = load_module(generate_module(net))
    model = memory_model(net)
    for batch in (2, 7):
        for dtype in (np.float64, np.float32):
            measured = measure_cache(net, module, batch=batch, dtype=dtype)
            assert predicted_bytes(model, batch, dtype) == measured
    t, d, h = (5, 3, 4) if sequence else (6, 4, 8)
    states = 1 if kind == "rnn" else 2
    gates = 0 if kind == "rnn" else 4
    head = t * h if sequence else 0  # the flattened copy the head keeps
    expected = d * t + states * (t + 1) * h + gates * t * h + head
    assert predicted_bytes(model, 1, np.float64) == 8 * expected


@pytest.mark.parametrize("fields, field, message", [
    ("hidden = 0", "hidden", "must be a positive integer, got 0"),
    ('hidden = "8"', "hidden", "must be a positive integer"),
    ("hidden = 8, sequence = 1", "sequence", "must be true or false, got 1"),
    ("hidden = 8, layers = 2", "layers", "unknown field for lstm"),
])
def test_bad_fields_are_one_line_errors(capsys, tmp_path, fields, field, message):
    spec = tmp_path / "bad.toml"
    spec.write_text('input = { shape = [6, 4] }\nloss = "mse"\n'
                    f'layers = [{{ type = "lstm", name = "enc", {fields} }}]\n')
    assert cli.main(["check", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 'enc'" in err and f"field '{field}'" in err
    assert message in err


def test_lstm_on_feature_vectors_is_a_one_line_error(capsys, tmp_path):
    spec = tmp_path / "flat.toml"
    spec.write_text('input = { features = 4 }\nloss = "mse"\n'
                    'layers = [{ type = "lstm", name = "enc", hidden = 3 }]\n')
    assert cli.main(["codegen", str(spec), "-o", str(tmp_path / "m.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 'enc'" in err and "lstm expects sequences (T, D)" in err
