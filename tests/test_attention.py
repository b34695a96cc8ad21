"""Sequences per sample and self-attention (issue 25, part 2), checked against PyTorch.

* a network on sequences ``(T, D)`` (inputs ``(N, T, D)``, batch first) agrees with PyTorch's
  modules applied position-wise (``nn.Linear`` on a 3-D tensor, ``nn.LayerNorm(D)``, softmax
  along the last axis, flatten, mse) to 1e-10 in float64: the loss and every gradient;
* ``attention`` agrees with ``nn.MultiheadAttention(batch_first=True)`` and with
  ``F.scaled_dot_product_attention`` (the projections done in torch), causal and not, one head
  and several, to 1e-10;
* its backward is derived (``symbp derive`` prints softmax's compact backward inside) and
  proved at small sizes.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import sympy

import symbp
from symbp.checking.gradcheck import load_module
from symbp.declare.net import Net
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import default_sizes, verify_layer
from symbp.emit.module import generate_module
from symbp.errors import SpecError

torch = pytest.importorskip("torch")
tF = torch.nn.functional

TOLERANCE = 1e-10

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def torch_attention(layer, p, h):
    """Self-attention in PyTorch: the projections by hand, the rest by
    ``F.scaled_dot_product_attention``; symbp's ``W`` is (in, out), PyTorch's weight its
    transpose."""
    batch, length, _ = h.shape
    heads = layer.heads

    def split(a):  # (N, T, M) -> (N, heads, T, M / heads)
        return a.reshape(batch, length, heads, -1).transpose(1, 2)

    width = p("bq").numel()  # symbp keeps the weights per head: (D, heads, width / heads)
    q, k, v = (split(h @ p(f"W{w}").reshape(-1, width) + p(f"b{w}").reshape(width))
               for w in "qkv")
    context = tF.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)
    return (context.transpose(1, 2).reshape(batch, length, width)
            @ p("Wo").reshape(width, -1) + p("bo"))


def torch_forward(items, params, h):
    for item in items:
        layer, kind = item.layer, item.layer.kind

        def p(name, item=item):
            return params[f"{item.name}.{name}"]

        if kind == "linear":
            h = h @ p("W") + p("b")
        elif kind == "flatten":
            h = h.flatten(1)
        elif kind == "layer_norm":  # over each position's features, as nn.LayerNorm(D)
            h = tF.layer_norm(h, h.shape[-1:], p("gamma"), p("beta"), eps=layer.eps)
        elif kind == "softmax":
            h = tF.softmax(h, dim=-1)
        elif kind == "log_softmax":
            h = tF.log_softmax(h, dim=-1)
        elif kind == "gelu":
            h = tF.gelu(h)
        elif kind == "tanh":
            h = torch.tanh(h)
        elif kind == "attention":
            h = torch_attention(layer, p, h)
        elif kind == "residual":
            h = h + torch_forward(item.body, params, h)
        else:
            raise AssertionError(f"no PyTorch oracle for {kind}")
    return h


def problem(net: Net, *, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in net.param_shapes.items():
        if key.endswith(".gamma"):
            params[key] = 1 + 0.2 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            params[key] = rng.standard_normal(shape) * 1.5 / math.sqrt(shape[0])
        else:
            params[key] = 0.3 * rng.standard_normal(shape)
    x = rng.standard_normal((batch, *net.input_shape))
    if net.loss.kind == "softmax_cross_entropy":
        y = rng.integers(0, net.output_shape[0], size=batch)
    else:
        y = rng.standard_normal((batch, *net.output_shape))
    return params, x, y


def relative_error(actual, expected) -> float:
    """Relative to the largest expected value; a gradient that is zero up to rounding is
    compared absolutely (the key bias's: a softmax does not change when the same number is
    added to every key's score, so ``dbk = 0`` exactly, and both sides are rounding noise)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-4))


def assert_agrees_with_torch(net: Net, *, batch: int = 3, seed: int = 0) -> None:
    """The loss and every gradient (the input's included) of the generated module."""
    module = load_module(generate_module(net))
    params, x, y = problem(net, batch=batch, seed=seed)
    loss, grads = module.loss_and_grads(params, x, y, rng=np.random.default_rng(0))
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    z = torch_forward(net.placed, tensors, tx)
    if net.loss.kind == "mse":
        expected_loss = tF.mse_loss(z, torch.tensor(y))
    else:
        expected_loss = tF.cross_entropy(z, torch.as_tensor(y))
    expected_loss.backward()
    assert abs(loss - expected_loss.item()) <= TOLERANCE * abs(expected_loss.item())
    expected = {k: t.grad.numpy() for k, t in tensors.items()} | {"x": tx.grad.numpy()}
    assert set(grads) == set(expected)
    errors = {k: relative_error(grads[k], g) for k, g in expected.items()}
    assert all(e < TOLERANCE for e in errors.values()), sorted(errors.items())
    out = module.predict(params, x)
    with torch.no_grad():
        want = torch_forward(net.placed, {k: torch.tensor(v) for k, v in params.items()},
                             torch.tensor(x))
    assert relative_error(out, want.numpy()) < TOLERANCE


# --------------------------------------------------------------------------- sequences


def test_position_wise_layers_on_sequences_agree_with_torch():
    net = Net(
        [
            symbp.layer_norm(name="ln"),
            symbp.linear(7, name="fc"),
            symbp.gelu(),
            symbp.residual([symbp.layer_norm(), symbp.linear(7), symbp.tanh()], name="blk"),
            symbp.softmax(),
            symbp.log_softmax(),
            symbp.linear(3, name="out"),
        ],
        input_shape=(5, 6),
        loss="mse",
    )
    assert net.output_shape == (5, 3)
    assert net.param_shapes["ln.gamma"] == (6,)  # the last axis only, as nn.LayerNorm(D)
    assert net.param_shapes["fc.W"] == (6, 7)
    assert_agrees_with_torch(net)


def test_sequences_flatten_to_features():
    net = Net([symbp.linear(5), symbp.gelu(), symbp.flatten(), symbp.linear(3)],
              input_shape=(4, 3), loss="softmax_cross_entropy")
    assert net.placed[2].out_shape == (20,)
    assert "h.reshape(len(h), 20)" in generate_module(net)
    assert_agrees_with_torch(net)


def test_sequence_input_from_toml_and_its_errors():
    net = symbp.parse_spec('input = { shape = [4, 8] }\nloss = "mse"\n'
                           '[[layers]]\ntype = "linear"\nout = 8\n')
    assert net.input_shape == (4, 8) and net.output_shape == (4, 8)
    with pytest.raises(SpecError, match=r"a sequence \[T, D\]"):
        Net([symbp.softmax()], input_shape=(2, 3, 4, 5), loss="mse")
    with pytest.raises(SpecError, match="feature-vector output"):
        Net([symbp.linear(3)], input_shape=(4, 8), loss="softmax_cross_entropy")


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_attention_agrees_with_scaled_dot_product_attention(heads, causal):
    net = Net([symbp.attention(heads, causal=causal, name="att")], input_shape=(5, 6),
              loss="mse")
    assert net.output_shape == (5, 6)
    assert net.param_shapes["att.Wq"] == (6, heads, 6 // heads)
    assert net.param_shapes["att.Wo"] == (heads, 6 // heads, 6)
    assert_agrees_with_torch(net)


def test_attention_with_its_own_width():
    net = Net([symbp.attention(2, width=8, name="att"), symbp.flatten(), symbp.linear(3)],
              input_shape=(4, 6), loss="softmax_cross_entropy")
    assert net.param_shapes["att.Wv"] == (6, 2, 4)
    assert_agrees_with_torch(net)


def test_attention_parameters_mean_what_multihead_attention_means():
    """The generated forward and input gradient equal nn.MultiheadAttention's with its
    weights read off symbp's (in_proj_weight = the three (D, width) blocks transposed)."""
    heads, length, width = 2, 5, 8
    net = Net([symbp.attention(heads, name="att")], input_shape=(length, width), loss="mse")
    module = load_module(generate_module(net))
    params, x, y = problem(net, batch=3, seed=4)
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.tensor(np.concatenate(
            [params[f"att.W{w}"].reshape(width, width).T for w in "qkv"])))
        mha.in_proj_bias.copy_(torch.tensor(np.concatenate(
            [params[f"att.b{w}"].reshape(width) for w in "qkv"])))
        mha.out_proj.weight.copy_(torch.tensor(params["att.Wo"].reshape(width, width).T))
        mha.out_proj.bias.copy_(torch.tensor(params["att.bo"]))
    tx = torch.tensor(x, requires_grad=True)
    out, _ = mha(tx, tx, tx, need_weights=False)
    expected = tF.mse_loss(out, torch.tensor(y))
    expected.backward()
    loss, grads = module.loss_and_grads(params, x, y)
    assert abs(loss - expected.item()) <= TOLERANCE * expected.item()
    assert relative_error(grads["x"], tx.grad.numpy()) < TOLERANCE
    assert relative_error(grads["att.Wq"].reshape(width, width).T,
                          mha.in_proj_weight.grad[:width].numpy()) < TOLERANCE
    assert relative_error(grads["att.Wo"].reshape(width, width).T,
                          mha.out_proj.weight.grad.numpy()) < TOLERANCE


def test_attention_fields_are_checked():
    with pytest.raises(SpecError, match="heads do not divide"):
        Net([symbp.attention(4)], input_shape=(3, 6), loss="mse")
    with pytest.raises(SpecError, match=r"expects sequences \(T, D\)"):
        Net([symbp.attention(1)], input_shape=(6,), loss="mse")
    with pytest.raises(SpecError, match="true or false"):
        symbp.attention(1, causal=1)


def test_attention_backward_is_the_staged_chain_rule_derived():
    """``symbp derive`` prints dq, dk, dv and the projections' gradients in terms of them, and
    the scores' gradient is softmax's compact backward ``p*(dp - sum_u p*dp)``; the module
    computes them whole-array (einsum over (N, heads, T, T)), no loop."""
    derivation = derive_layer(symbp.attention(2).forward_form((4, 6)))
    assert list(derivation.through) == ["c", "p", "s", "v", "k", "q"]
    n, h, t, u, w = sympy.symbols("n h t t' t''", integer=True)
    dp, p = sympy.IndexedBase("dp", real=True), sympy.IndexedBase("p", real=True)
    T = sympy.Symbol("T", integer=True, positive=True)
    compact = p[n, h, t, u] * (dp[n, h, t, u]
                               - sympy.Sum(dp[n, h, t, w] * p[n, h, t, w], (w, 0, T - 1)))
    assert sympy.expand(derivation.through["s"].expr - compact) == 0
    reads = {e.base.name for e in derivation.vjp["Wq"].expr.atoms(sympy.Indexed)}
    assert reads == {"dq", "x"}  # dWq = x^T dq: dq computed once, not substituted
    source = generate_module(Net([symbp.attention(2)], input_shape=(4, 6), loss="mse"))
    assert "for " not in source.split("def attention_forward")[1].split("def mse_forward")[0]
    assert 'ds = p*(dp + (-np.einsum("abcd,abcd->abc", dp, p))[:, :, :, None])' in source


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_is_proven(causal):
    """Compact and staged backward equal sympy's direct differentiation of the expanded
    forward at N=1, T=2, D=2, heads=1, E=2 (about a minute each uncausal, 12 s causal; the
    verifier's default sizes, N=2, T=2, D=3, heads=2, E=3, take over five minutes)."""
    derivation = derive_layer(symbp.attention(1, causal=causal).forward_form((2, 2)))
    sizes = {s: {"N": 1, "T": 2, "D": 2, "H": 1, "E": 2}[s.name]
             for s in default_sizes(derivation.form)}
    for staged in (False, True):
        verdicts = verify_layer(derivation, sizes, staged=staged)
        assert verdicts and all(v.proven for v in verdicts), [(v.name, v.detail) for v in verdicts]


def test_the_attention_block_example_checks_and_trains(monkeypatch):
    """examples/attention_block.toml passes finite differences, and plain SGD on its
    generated module lowers the loss of the synthetic sequence task
    (examples/train_attention.py)."""
    from pathlib import Path

    from symbp.checking.gradcheck import check_spec

    examples = Path(__file__).resolve().parents[1] / "examples"
    report = check_spec(symbp.load_spec(examples / "attention_block.toml"), batch=3, seed=0)
    assert report.passed, report.table()
    monkeypatch.syspath_prepend(str(examples))
    example = importlib.import_module("train_attention")
    losses, accuracy = example.train(steps=60, every=0)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy > 0.5  # chance is 0.25


def test_float32_attention_stays_float32():
    """1/sqrt(E) is printed as Python arithmetic on the int E (``1/E**0.5``): a NumPy float64
    scalar (``np.sqrt(E)``) would promote the float32 scores, and with them everything
    after, to float64 (NEP 50), doubling the time of every later product."""
    net = Net([symbp.attention(heads=2, name="mha")], input_shape=(5, 8), loss="mse")
    module = load_module(generate_module(net), "attention_float32")
    params = module.init_params(seed=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    y, cache = module.forward(params, x)
    assert y.dtype == np.float32
    assert all(a.dtype == np.float32 for a in cache["mha"])
    loss, grads = module.loss_and_grads(params, x, np.zeros_like(x))
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    # and the same numbers as in float64, to float32's precision
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    y64, _ = module.forward(params64, x.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)
