"""The embedding layer (issue 24, item 2): integer ids in, rows of a learned table out.

Truths that are not symbp's own:

* PyTorch (``nn.Embedding`` and its autograd, float64) gives the loss and every gradient of
  the generated module to 1e-10, ids repeated within a batch and a sequence of ids included;
* direct differentiation of the fully expanded forward, for every assignment of the ids at
  small sizes, proves the derived weight gradient (the engine's verifier), and refutes a
  wrong one;
* ``np.add.at`` (an independent scatter-add) gives the runtime's ``_scatter_rows``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symbp
from symbp.checking.gradcheck import check_spec, load_module
from symbp.derivation.layer import Adjoint, derive_layer
from symbp.derivation.verify import default_sizes, id_assignments, verify_layer
from symbp.emit.module import generate_module
from symbp.errors import SpecError
from symbp.flow.chain import flow_bounds
from symbp.flow.memory import measure_cache, memory_model, predicted_bytes
from symbp.runtime.gather import _scatter_rows

TOLERANCE = 1e-10
EXAMPLE = "examples/embedding_bag.toml"

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _bag(vocabulary=11, length=5, dim=4, classes=3, num=None):
    return symbp.Net(
        [symbp.embedding(dim, num=num, name="emb"), symbp.flatten(), symbp.linear(6, name="fc1"),
         symbp.relu(), symbp.linear(classes, name="out")],
        input_ids=vocabulary, input_shape=(length,), loss="softmax_cross_entropy",
    )


# --------------------------------------------------------------------------- the oracle
def _torch_bag(net, params, ids, labels):
    """The same network in PyTorch's modules (nn.Embedding's table set to the module's)."""
    torch = pytest.importorskip("torch")
    emb = net.placed[0].layer
    table = torch.nn.Embedding(params["emb.W"].shape[0], emb.dim, dtype=torch.float64)
    with torch.no_grad():
        table.weight.copy_(torch.tensor(params["emb.W"]))
    weights = {k: torch.tensor(v, requires_grad=True) for k, v in params.items() if k != "emb.W"}
    h = table(torch.tensor(ids))
    if "fc1.W" in weights:
        h = torch.relu(h.flatten(1) @ weights["fc1.W"] + weights["fc1.b"])
    h = h @ weights["out.W"] + weights["out.b"]
    loss = torch.nn.functional.cross_entropy(h, torch.tensor(labels))
    loss.backward()
    grads = {k: w.grad.numpy() for k, w in weights.items()}
    grads["emb.W"] = table.weight.grad.numpy()
    return float(loss.detach()), grads


@pytest.mark.parametrize("sequence", [True, False])
def test_loss_and_every_gradient_match_pytorch(sequence):
    pytest.importorskip("torch")
    if sequence:
        net = _bag(num=14)  # more rows than ids: the rows no id reads get a zero gradient
    else:
        net = symbp.Net([symbp.embedding(5, name="emb"), symbp.linear(3, name="out")],
                        input_ids=9, loss="softmax_cross_entropy")
    module = load_module(generate_module(net))
    rng = np.random.default_rng(3)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in module.init_params().items()}
    shape = (6, *net.input_shape)
    ids = rng.integers(0, net.input_ids, size=shape)
    ids.flat[:4] = 2  # the same id four times: their rows of dy add up in dW[2]
    labels = rng.integers(0, 3, size=6)
    loss, grads = module.loss_and_grads(params, ids, labels)
    expected_loss, expected = _torch_bag(net, params, ids, labels)
    assert abs(loss - expected_loss) <= TOLERANCE * abs(expected_loss)
    assert set(grads) == set(expected)  # no gradient for the ids
    for key, value in expected.items():
        np.testing.assert_allclose(grads[key], value, rtol=0, atol=TOLERANCE)
    assert np.abs(grads["emb.W"][2]).max() > 0
    unread = np.setdiff1d(np.arange(len(grads["emb.W"])), ids)
    assert not grads["emb.W"][unread].any()


@st.composite
def _drawn(draw):
    """An embedding (one id or a sequence, a table of V or more rows) then a mix of layers."""
    vocabulary, dim = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    length = draw(st.sampled_from([None, 1, 3]))
    layers = [symbp.embedding(dim, num=draw(st.sampled_from([None, vocabulary + 2])))]
    if draw(st.booleans()):
        layers.append(draw(st.sampled_from([symbp.tanh, symbp.relu, symbp.sigmoid]))())
    if length is not None:
        layers.append(symbp.flatten())
    if draw(st.booleans()):
        layers.append(symbp.layer_norm())
    layers.append(symbp.linear(draw(st.integers(1, 4))))
    net = symbp.Net(layers, input_ids=vocabulary, loss="mse",
                    input_shape=None if length is None else (length,))
    ids = draw(st.lists(st.integers(0, vocabulary - 1), min_size=1, max_size=4))
    batch = np.array(ids * (length or 1)).reshape(len(ids), *net.input_shape)
    return net, batch


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_drawn())
def test_drawn_networks_match_pytorch_autograd(drawn):
    torch = pytest.importorskip("torch")
    net, ids = drawn
    module = load_module(generate_module(net))
    params = module.init_params(seed=1)
    rng = np.random.default_rng(2)
    target = rng.standard_normal((len(ids), *net.output_shape))
    loss, grads = module.loss_and_grads(params, ids, target)
    weights = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = torch.tensor(ids)
    for item in net.placed:
        kind = item.layer.kind
        if kind == "embedding":
            h = torch.nn.functional.embedding(h, weights[f"{item.name}.W"])
        elif kind == "flatten":
            h = h.flatten(1)
        elif kind == "layer_norm":
            h = torch.nn.functional.layer_norm(h, h.shape[1:], weights[f"{item.name}.gamma"],
                                               weights[f"{item.name}.beta"], eps=item.layer.eps)
        elif kind == "linear":
            h = h @ weights[f"{item.name}.W"] + weights[f"{item.name}.b"]
        else:
            h = getattr(torch, kind)(h)
    expected = torch.mean((h - torch.tensor(target)) ** 2)
    expected.backward()
    assert abs(float(loss) - float(expected.detach())) <= TOLERANCE * max(1.0, float(loss))
    assert set(grads) == set(weights)
    for key, weight in weights.items():
        np.testing.assert_allclose(grads[key], weight.grad.numpy(), rtol=0, atol=TOLERANCE)


def test_layer_functions_match_pytorch_in_float32_and_float64():
    torch = pytest.importorskip("torch")
    module = load_module(generate_module(_bag()))
    rng = np.random.default_rng(0)
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-5)):
        table = rng.standard_normal((11, 4)).astype(dtype)
        ids = rng.integers(0, 11, size=(7, 5))
        dy = rng.standard_normal((7, 5, 4)).astype(dtype)
        y, cache = module.embedding_forward(ids, table)
        assert y.dtype == dtype and np.array_equal(cache[0], ids)
        dW = module.embedding_backward(dy, *cache, V=11)
        assert dW.dtype == dtype
        weight = torch.tensor(table, requires_grad=True)
        out = torch.nn.functional.embedding(torch.tensor(ids), weight)
        out.backward(torch.tensor(dy))
        np.testing.assert_array_equal(y, out.detach().numpy())
        np.testing.assert_allclose(dW, weight.grad.numpy(), rtol=0, atol=tolerance)


def test_scatter_rows_against_add_at():
    rng = np.random.default_rng(1)
    for dtype in (np.float64, np.float32):
        ids = rng.integers(0, 6, size=(9, 4))
        rows = rng.standard_normal((9, 4, 3)).astype(dtype)
        expected = np.zeros((8, 3), dtype)
        np.add.at(expected, ids.reshape(-1), rows.reshape(-1, 3))
        got = _scatter_rows(rows, ids, 8)
        assert got.dtype == dtype and got.shape == (8, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-14)
    empty = _scatter_rows(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 5)
    assert empty.shape == (5, 3) and not empty.any()


# --------------------------------------------------------------------------- the module
@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([[0, 1, 2, 3, 11]] * 2), r"in \[0, 11\); it holds 0 to 11"),
        (np.array([[0, 1, -1, 3, 4]] * 2), r"in \[0, 11\); it holds -1 to 4"),
        (np.zeros((2, 5)), "integer ids .* not dtype float64"),
        (np.zeros((2, 5), dtype=bool), "integer ids .* not dtype bool"),
        (np.zeros((2, 4), dtype=int), r"x has shape \(2, 4\); expected \(N, 5\)"),
    ],
)
def test_bad_ids_are_a_value_error(ids, message):
    module = load_module(generate_module(_bag()))
    params = module.init_params()
    with pytest.raises(ValueError, match=message):
        module.forward(params, ids)
    with pytest.raises(ValueError, match=message):
        module.loss_and_grads(params, ids, np.zeros(len(ids), dtype=int))


def test_backward_keeps_only_the_ids_and_returns_no_input_gradient():
    net = _bag()
    source = generate_module(net)
    module = load_module(source)
    params = module.init_params()
    ids = np.random.default_rng(0).integers(0, 11, size=(3, 5))
    out, cache = module.forward(params, ids)
    assert len(cache["emb"]) == 1 and cache["emb"][0] is ids
    grads = module.backward(params, cache, np.ones_like(out), wrt_input=True)
    assert "x" not in grads and grads["emb.W"].shape == (11, 4)
    backward = source[source.index("def embedding_backward"):]
    backward = backward[: backward.index("\n\n\n")]
    assert "_scatter_rows(dy, ids, V)" in backward and "for " not in backward.split('"""')[-1]
    model = memory_model(net)
    assert [e.name for e in model[0].entries] == ["ids"]
    assert predicted_bytes(model, 4, np.float32) == measure_cache(
        net, module, batch=4, dtype=np.float32)


# --------------------------------------------------------------------------- the derivation
def test_weight_gradient_is_derived_and_proved_for_every_assignment_of_the_ids():
    layer = symbp.embedding(3)
    layer.bind_ids(3)
    form = layer.forward_form((2,))
    derivation = derive_layer(form)
    assert set(derivation.vjp) == {"W"}  # nothing for the integer ids
    assert derivation.stored == ("ids",)
    expr = derivation.vjp["W"].expr
    assert expr.has(sp.KroneckerDelta) and isinstance(expr, sp.Sum)
    sizes = default_sizes(form)
    assert len(id_assignments(form, sizes)) > 1
    assert all(v.proven for v in verify_layer(derivation, sizes))
    # a wrong formula (dy summed over the samples, whatever their ids) is refuted
    wrong = sp.Sum(expr.function.replace(lambda e: isinstance(e, sp.KroneckerDelta),
                                         lambda e: sp.Integer(1)), *expr.limits)
    derivation.vjp["W"] = Adjoint(derivation.vjp["W"].array, derivation.vjp["W"].indices, wrong)
    assert not any(v.proven for v in verify_layer(derivation, sizes))


def test_check_derive_notes_and_flow_run_on_the_example():
    net = symbp.load_spec(EXAMPLE)
    report = check_spec(net)
    assert all(row.passed for row in report.rows), report
    assert any(row.name == "emb.W" for row in report.rows)
    assert not any(row.name == "x" for row in report.rows)
    rows = flow_bounds(symbp.derive(net))
    assert rows[0].layer == "emb" and rows[0].bound is None
    assert "scatter" in str(symbp.notes(net, "tex"))
    done = subprocess.run([sys.executable, "-m", "symbp", "derive", EXAMPLE, "--layer", "emb",
                           "--verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dW = _scatter_rows(dy, ids, V)" in done.stdout and "proven equal" in done.stdout


# --------------------------------------------------------------------------- declaration
@pytest.mark.parametrize(
    "spec, where, message",
    [
        ('input = { ids = 10 }\n[[layers]]\ntype = "linear"\nout = 3',
         "layer 'linear1', field 'type'", "the first layer must read them"),
        ('input = { features = 10 }\n[[layers]]\ntype = "embedding"\ndim = 3',
         "layer 'embedding1', field 'type'", "must be the first layer"),
        ('input = { ids = 10 }\n[[layers]]\ntype = "embedding"\ndim = 3\n'
         '[[layers]]\ntype = "embedding"\ndim = 3',
         "layer 'embedding2', field 'type'", "must be the first layer"),
        ('input = { ids = 10 }\n[[layers]]\ntype = "embedding"\ndim = 3\nnum = 5',
         "layer 'embedding1', field 'num'", "num must be at least 10"),
        ('input = { ids = 0 }\n[[layers]]\ntype = "embedding"\ndim = 3',
         "field 'input'", "positive integer"),
        ('input = { ids = 10, shape = [2, 3] }\n[[layers]]\ntype = "embedding"\ndim = 3',
         "field 'input'", r"shape is \[T\]"),
        ('input = { ids = 10, shape = [0] }\n[[layers]]\ntype = "embedding"\ndim = 3',
         "field 'input'", r"shape is \[T\]"),
        ('input = { ids = 10, features = 2 }\n[[layers]]\ntype = "embedding"\ndim = 3',
         "field 'input'", "only other key"),
    ],
)
def test_declaration_errors_name_the_file_layer_and_field(tmp_path, spec, where, message):
    path = tmp_path / "bad.toml"
    path.write_text(spec)
    with pytest.raises(SpecError, match=message) as raised:
        symbp.load_spec(path)
    assert f"{path}: {where}" in str(raised.value)
    done = subprocess.run([sys.executable, "-m", "symbp", "derive", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_python_api_errors():
    with pytest.raises(SpecError, match="ids or features"):
        symbp.Net([symbp.embedding(3)], input_ids=5, input_features=4)
    with pytest.raises(SpecError, match=r"shape is \[T\]"):
        symbp.Net([symbp.embedding(3)], input_ids=5, input_shape=(2, 2))
    with pytest.raises(SpecError, match="dim"):
        symbp.embedding(0)
    net = symbp.Net([symbp.embedding(3)], input_ids=5, input_shape=[4])
    assert net.input_shape == (4,) and net.output_shape == (4, 3)
