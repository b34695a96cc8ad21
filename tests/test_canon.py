"""The canon layers (issue 24, item 2), each proved right against truths that are not symbp's own.

* the derived backward (compact and staged) equals direct differentiation of the fully expanded
  scalar forward at small concrete sizes (the engine's verifier);
* generated modules agree with PyTorch (CPU, float64) to 1e-10 in a small network: the loss, the
  output, the input gradient and every parameter gradient, in training and evaluation mode;
* the TOML fields are checked with one-line errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy

import symbp
from symbp.checking.gradcheck import check_spec, load_module
from symbp.declare.net import Net
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import default_sizes, verify_layer
from symbp.emit.module import generate_module
from symbp.errors import SpecError

torch = pytest.importorskip("torch")
tF = torch.nn.functional

TOLERANCE = 1e-10

pytestmark = pytest.mark.usefixtures("one_blas_thread")


# --------------------------------------------------------------------------- the oracle


def torch_forward(items, params, h, *, train: bool, masks: dict | None = None):
    """The network in PyTorch's own modules and functions, layer by layer; ``masks`` (a
    ``np.random.Generator`` seeded as the module's ``rng``) draws the dropout masks."""
    for item in items:
        layer, kind = item.layer, item.layer.kind

        def p(name, item=item):
            return params[f"{item.name}.{name}"]

        if kind == "linear":
            h = h @ p("W") + p("b") if layer.bias else h @ p("W")
        elif kind == "conv2d":
            h = tF.conv2d(h, p("W"), p("b") if layer.bias else None, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation)
        elif kind == "global_avgpool":
            h = tF.adaptive_avg_pool2d(h, 1).flatten(1)
        elif kind == "flatten":
            h = h.flatten(1)
        elif kind == "layer_norm":
            h = tF.layer_norm(h, tuple(h.shape[1:]), p("gamma"), p("beta"), eps=layer.eps)
        elif kind == "group_norm":
            h = tF.group_norm(h, layer.groups, p("gamma"), p("beta"), eps=layer.eps)
        elif kind == "softmax":
            h = tF.softmax(h, dim=1)
        elif kind == "log_softmax":
            h = tF.log_softmax(h, dim=1)
        elif kind == "dropout":  # the module's mask, drawn from a generator seeded alike
            if train:
                mask = torch.tensor(masks.binomial(1, 1 - layer.p, size=tuple(h.shape)))
                h = h * mask / (1 - layer.p)
            else:
                h = tF.dropout(h, layer.p, training=False)
        elif kind == "gelu":
            h = tF.gelu(h)
        elif kind == "relu":
            h = tF.relu(h)
        elif kind == "tanh":
            h = torch.tanh(h)
        elif kind == "residual":
            h = h + torch_forward(item.body, params, h, train=train, masks=masks)
        else:
            raise AssertionError(f"no PyTorch oracle for {kind}")
    return h


def torch_loss(kind: str, z, y):
    if kind == "softmax_cross_entropy":
        return tF.cross_entropy(z, torch.as_tensor(y))
    if kind == "mse":
        return tF.mse_loss(z, y)
    raise AssertionError(kind)


def problem(net: Net, *, batch: int, seed: int):
    """Generic parameters (gamma near 1, nonzero beta), input and targets."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in net.param_shapes.items():
        if key.endswith(".gamma"):
            params[key] = 1 + 0.2 * rng.standard_normal(shape)
        elif key.endswith(".W"):
            fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[0]
            params[key] = rng.standard_normal(shape) * 1.5 / math.sqrt(fan_in)
        else:
            params[key] = 0.3 * rng.standard_normal(shape)
    x = rng.standard_normal((batch, *net.input_shape))
    if net.loss.kind == "softmax_cross_entropy":
        y = rng.integers(0, net.output_shape[0], size=batch)
    else:
        y = rng.standard_normal((batch, *net.output_shape))
    return params, x, y


def relative_error(actual, expected) -> float:
    """Relative to the largest expected entry, or to 1e-4 when it is smaller: a gradient that
    is zero in exact arithmetic (a bias right before a normalisation of its whole group) is
    rounding noise of 1e-17 to 1e-16 on both sides, compared then to within 1e-14 absolutely."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-4))


def assert_agrees_with_torch(net: Net, *, batch: int = 5, seed: int = 0,
                             rng_seed: int = 7) -> None:
    """Loss, every gradient (input included), the training output and ``predict``."""
    module = load_module(generate_module(net))
    params, x, y = problem(net, batch=batch, seed=seed)
    loss, grads = module.loss_and_grads(params, x, y, rng=np.random.default_rng(rng_seed))

    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    target = torch.tensor(y) if net.loss.kind == "mse" else y
    masks = np.random.default_rng(rng_seed)
    expected_loss = torch_loss(net.loss.kind, torch_forward(net.placed, tensors, tx, train=True,
                                                            masks=masks), target)
    expected_loss.backward()
    assert abs(loss - expected_loss.item()) <= TOLERANCE * abs(expected_loss.item())
    expected = {k: t.grad.numpy() for k, t in tensors.items()} | {"x": tx.grad.numpy()}
    assert set(grads) == set(expected)
    errors = {k: relative_error(grads[k], g) for k, g in expected.items()}
    assert all(e < TOLERANCE for e in errors.values()), errors

    with torch.no_grad():
        plain = {k: torch.tensor(v) for k, v in params.items()}
        out, _ = module.forward(params, x, train=True, rng=np.random.default_rng(rng_seed))
        masks = np.random.default_rng(rng_seed)
        want = torch_forward(net.placed, plain, torch.tensor(x), train=True, masks=masks)
        assert relative_error(out, want.numpy()) < TOLERANCE
        predicted = module.predict(params, x)
        want = torch_forward(net.placed, plain, torch.tensor(x), train=False)
        assert relative_error(predicted, want.numpy()) < TOLERANCE


def assert_proven(layer, in_shape, **sizes) -> None:
    """Compact and staged backward equal direct differentiation at small concrete sizes."""
    derivation = derive_layer(layer.forward_form(in_shape))
    concrete = default_sizes(derivation.form)
    for symbol in list(concrete):
        if symbol.name in sizes:
            concrete[symbol] = sizes[symbol.name]
    for staged in (False, True):
        results = verify_layer(derivation, concrete, staged=staged)
        assert results and all(r.proven for r in results), [(r.name, r.detail) for r in results]


# --------------------------------------------------------------------------- layer_norm


def test_layer_norm_compact_backward_is_derived_and_proven():
    derivation = derive_layer(symbp.layer_norm().forward_form((6,)))
    dx = derivation.vjp["x"].expr
    # the compact form reads what the forward keeps, not the input
    assert derivation.stored == ("gamma", "invstd", "xhat")
    assert "x[" not in str(dx).replace("xhat[", "")
    assert_proven(symbp.layer_norm(), (6,), N=2, F=3)


def test_layer_norm_over_images_is_proven():
    assert_proven(symbp.layer_norm(), (2, 2, 2), N=2, C=2, H_in=1, W_in=2)


def test_layer_norm_agrees_with_torch():
    net = Net([symbp.linear(6, name="fc1"), symbp.layer_norm(name="ln1"), symbp.gelu(),
               symbp.linear(6), symbp.layer_norm(eps=1e-3), symbp.linear(3, name="out")],
              input_features=4, loss="softmax_cross_entropy")
    assert_agrees_with_torch(net)


def test_layer_norm_in_a_residual_block_agrees_with_torch():
    net = Net([symbp.linear(5), symbp.residual([symbp.layer_norm(), symbp.linear(5),
                                                 symbp.tanh()]), symbp.linear(2)],
              input_features=3, loss="mse")
    assert_agrees_with_torch(net, seed=1)


def test_layer_norm_over_images_agrees_with_torch():
    net = Net([symbp.conv2d(3, 2, padding=1), symbp.layer_norm(name="ln"), symbp.relu(),
               symbp.flatten(), symbp.linear(3)],
              input_shape=(2, 4, 3), loss="softmax_cross_entropy")
    assert net.param_shapes["ln.gamma"] == (3, 5, 4)  # nn.LayerNorm([C, H, W])
    assert_agrees_with_torch(net, seed=2)


def test_layer_norm_toml_and_its_errors():
    spec = """
input = { features = 4 }
loss = "mse"
[[layers]]
type = "layer_norm"
name = "ln"
eps = %s
"""
    net = symbp.parse_spec(spec % "1e-6")
    assert net.placed[0].layer.eps == 1e-6 and net.param_shapes["ln.gamma"] == (4,)
    assert check_spec(net, batch=3, seed=0).passed
    for bad, said in (("0", "ln.*eps.*must be positive"), ('"x"', "ln.*eps.*must be a number")):
        with pytest.raises(SpecError, match=said):
            symbp.parse_spec(spec % bad)
    with pytest.raises(SpecError, match="momentum.*unknown field for layer_norm"):
        symbp.parse_spec(spec % "1e-5" + "momentum = 0.1\n")


# --------------------------------------------------------------------------- group_norm


def test_group_norm_compact_backward_is_derived_and_proven():
    derivation = derive_layer(symbp.group_norm(2).forward_form((4, 3, 2)))
    dx = derivation.vjp["x"].expr
    # the compact form reads what the forward keeps: not the input, not the group means
    assert derivation.stored == ("gamma", "invstd", "xhat")
    assert "x[" not in str(dx).replace("xhat[", "") and "mu[" not in str(dx)
    # two groups of two channels, so that a channel's group and a group's channels both matter
    assert_proven(symbp.group_norm(2), (4, 1, 2), N=2, C=4, H_in=1, W_in=2)


def test_group_norm_agrees_with_torch():
    """As F.group_norm in a small conv net: loss, output, input and every parameter gradient."""
    net = Net([symbp.conv2d(6, 3, padding=1, name="conv"), symbp.group_norm(3, name="gn"),
               symbp.relu(), symbp.conv2d(4, 3), symbp.group_norm(2, eps=1e-3),
               symbp.global_avgpool(), symbp.linear(3)],
              input_shape=(2, 5, 4), loss="softmax_cross_entropy")
    assert net.param_shapes["gn.gamma"] == (6,)  # per channel, as nn.GroupNorm(3, 6)
    assert_agrees_with_torch(net, seed=3)
    # one group is layer norm over the whole image, C groups is instance norm (no bias
    # before it: a channel's bias cancels there, its gradient is 0 up to rounding)
    for groups in (1, 4):
        net = Net([symbp.conv2d(4, 3, padding=1, bias=False), symbp.group_norm(groups),
                   symbp.flatten(),
                   symbp.linear(2)], input_shape=(2, 3, 3), loss="mse")
        assert_agrees_with_torch(net, seed=groups)


def test_group_norm_toml_and_its_errors():
    spec = """
input = { shape = [4, 3, 2] }
loss = "mse"
[[layers]]
type = "group_norm"
name = "gn"
%s
[[layers]]
type = "flatten"
"""
    net = symbp.parse_spec(spec % "groups = 2\neps = 1e-6")
    layer = net.placed[0].layer
    assert (layer.groups, layer.eps) == (2, 1e-6) and net.param_shapes["gn.beta"] == (4,)
    assert check_spec(net, batch=3, seed=0).passed
    for bad, said in (("groups = 3", "gn.*groups.*3 groups do not divide the 4 channels"),
                      ("groups = 0", "gn.*groups.*must be a positive integer"),
                      ("groups = 1.5", "gn.*groups.*must be a positive integer"),
                      ("", "gn.*groups.*missing field for group_norm"),
                      ("groups = 2\neps = 0", "gn.*eps.*must be positive")):
        with pytest.raises(SpecError, match=said):
            symbp.parse_spec(spec % bad)
    with pytest.raises(SpecError, match="gn.*group_norm expects images"):
        symbp.parse_spec(spec.replace("shape = [4, 3, 2]", "features = 4").replace(
            '[[layers]]\ntype = "flatten"\n', "") % "groups = 2")


# --------------------------------------------------------------------------- softmax, log_softmax


def test_softmax_compact_backward_is_the_textbook_form_derived():
    """``dx = y * (dy - sum_k y * dy)``: derived by the engine from the forward declaration."""
    derivation = derive_layer(symbp.softmax().forward_form((4,)))
    form = derivation.form
    y, dy = form.arrays["y"].base, derivation.upstream.base
    n, j = derivation.vjp["x"].indices
    k = sympy.Symbol("k", integer=True)
    F = form.arrays["x"].dims[1]
    textbook = y[n, j] * (dy[n, j] - sympy.Sum(y[n, k] * dy[n, k], (k, 0, F - 1)))
    assert sympy.expand(derivation.vjp["x"].expr - textbook) == 0
    assert derivation.stored == ("y",)
    assert_proven(symbp.softmax(), (4,), N=2, F=3)


def test_log_softmax_compact_backward_reads_the_kept_softmax():
    """``dx = dy - softmax(x) * sum_k dy``, the softmax kept by the forward pass."""
    derivation = derive_layer(symbp.log_softmax().forward_form((4,)))
    assert [c.array.name for c in derivation.carried] == ["softmax_x"]
    assert derivation.code_reads == ()  # nothing but the kept softmax
    assert_proven(symbp.log_softmax(), (4,), N=2, F=3)


def test_softmax_and_log_softmax_agree_with_torch():
    net = Net([symbp.linear(5, name="fc1"), symbp.softmax(name="sm"), symbp.linear(6),
               symbp.log_softmax(name="lsm"), symbp.linear(3)],
              input_features=4, loss="softmax_cross_entropy")
    assert_agrees_with_torch(net)
    net = Net([symbp.linear(4), symbp.log_softmax(), symbp.layer_norm(), symbp.linear(4),
               symbp.softmax()], input_features=3, loss="mse")
    assert_agrees_with_torch(net, seed=3)


def test_softmax_forward_does_not_overflow():
    """Inputs of 1000 (exp overflows float64 at 710): the outputs and gradients are PyTorch's."""
    for layer, function in ((symbp.softmax(), tF.softmax), (symbp.log_softmax(), tF.log_softmax)):
        net = Net([layer], input_features=3, loss="mse")
        module = load_module(generate_module(net))
        x = np.array([[1000.0, 999.0, -1000.0], [-800.0, -801.0, -805.0]])
        dy = np.array([[0.3, -1.0, 2.0], [1.0, 0.5, -0.25]])
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out, cache = module.forward({}, x)
            grads = module.backward({}, cache, dy)
        tx = torch.tensor(x, requires_grad=True)
        want = function(tx, dim=1)
        want.backward(torch.tensor(dy))
        assert np.all(np.isfinite(out)) and relative_error(out, want.detach().numpy()) < 1e-15
        assert relative_error(grads["x"], tx.grad.numpy()) < 1e-15


def test_softmax_toml_and_its_errors():
    spec = """
input = { %s }
loss = "mse"
[[layers]]
type = "%s"
name = "s"
"""
    for kind in ("softmax", "log_softmax"):
        net = symbp.parse_spec(spec % ("features = 4", kind))
        assert check_spec(net, batch=3, seed=0).passed
        with pytest.raises(SpecError, match=f"layer 's'.*{kind} expects feature vectors"):
            symbp.parse_spec(spec % ("shape = [2, 3, 3]", kind))
        with pytest.raises(SpecError, match=f"unknown field for {kind}"):
            symbp.parse_spec(spec % ("features = 4", kind) + "dim = 1\n")


# --------------------------------------------------------------------------- global_avgpool


def test_global_avgpool_backward_is_derived_and_proven():
    derivation = derive_layer(symbp.global_avgpool().forward_form((3, 4, 5)))
    assert derivation.stored == ()  # the gradient is dy spread evenly: nothing kept
    assert_proven(symbp.global_avgpool(), (2, 3, 2), N=2, C=2, H_in=3, W_in=2)


def test_global_avgpool_agrees_with_torch():
    net = Net([symbp.conv2d(3, 3, padding=1), symbp.relu(), symbp.global_avgpool(name="gap"),
               symbp.linear(4)], input_shape=(2, 5, 4), loss="softmax_cross_entropy")
    assert net.output_shape == (4,)
    assert_agrees_with_torch(net)
    # the input gradient is a whole array of the input's shape, which the layer below writes
    module = load_module(generate_module(net))
    dx = module.global_avgpool_backward(np.ones((3, 3)), H_in=5, W_in=4)
    assert dx.shape == (3, 3, 5, 4) and dx.flags.writeable and np.all(dx == 1 / 20)


def test_global_avgpool_toml_and_its_errors():
    spec = """
input = { %s }
loss = "mse"
[[layers]]
type = "global_avgpool"
name = "gap"
"""
    net = symbp.parse_spec(spec % "shape = [3, 2, 2]")
    assert net.output_shape == (3,)
    assert check_spec(net, batch=3, seed=0).passed
    with pytest.raises(SpecError, match="layer 'gap'.*global_avgpool expects images"):
        symbp.parse_spec(spec % "features = 4")
    with pytest.raises(SpecError, match="unknown field for global_avgpool"):
        symbp.parse_spec(spec % "shape = [3, 2, 2]" + "kernel = 2\n")


# --------------------------------------------------------------------------- dropout


def test_dropout_backward_is_derived_and_proven():
    derivation = derive_layer(symbp.dropout(p=0.25).forward_form((4,)))
    assert derivation.stored == ("m",)  # the mask, kept for backward
    assert_proven(symbp.dropout(), (4,), N=2, F=2)
    assert_proven(symbp.dropout(), (2, 2, 1), N=2, C=2, H_in=2, W_in=1)


def test_dropout_agrees_with_torch_in_training_and_evaluation():
    net = Net([symbp.linear(6, name="fc1"), symbp.relu(), symbp.dropout(p=0.3, name="drop"),
               symbp.linear(6), symbp.layer_norm(), symbp.dropout(p=0.1), symbp.linear(3)],
              input_features=4, loss="softmax_cross_entropy")
    assert_agrees_with_torch(net, batch=8)
    images = Net([symbp.conv2d(3, 2), symbp.dropout(p=0.5), symbp.global_avgpool(),
                  symbp.linear(2)], input_shape=(2, 4, 4), loss="mse")
    assert_agrees_with_torch(images, seed=4)


def test_dropout_is_f_dropout_given_its_mask():
    """PyTorch draws the mask: fed that mask, the generated layer functions compute
    ``F.dropout``'s output and input gradient (the inverted scaling 1/(1 - p))."""
    module = load_module(generate_module(Net([symbp.dropout(p=0.35)], input_features=50,
                                             loss="mse")))
    x = np.random.default_rng(0).standard_normal((40, 50))
    dy = np.random.default_rng(1).standard_normal((40, 50))
    torch.manual_seed(5)
    scaled = tF.dropout(torch.ones(40, 50, dtype=torch.float64), 0.35, training=True).numpy()
    mask = (scaled != 0).astype(float)
    assert 0 < mask.mean() < 1 and np.all(scaled[mask == 1] == 1 / 0.65)
    torch.manual_seed(5)  # the same mask again
    tx = torch.tensor(x, requires_grad=True)
    want = tF.dropout(tx, 0.35, training=True)
    want.backward(torch.tensor(dy))
    out, cache = module.dropout_forward(x.copy(), mask, p=0.35)
    assert relative_error(out, want.detach().numpy()) < 1e-15
    assert relative_error(module.dropout_backward(dy.copy(), *cache, p=0.35), tx.grad.numpy()) \
        < 1e-15


def test_dropout_draws_its_mask_from_rng_and_keeps_it():
    module = load_module(generate_module(Net([symbp.dropout(p=0.3, name="drop")],
                                             input_features=1000, loss="mse")))
    x = np.ones((100, 1000))
    out, cache = module.forward({}, x, rng=np.random.default_rng(3))
    (mask,) = cache["drop"]
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert abs(mask.mean() - 0.7) < 0.01  # 1e5 draws: the standard error is 0.0015
    assert np.array_equal(out, mask / 0.7)
    again, _ = module.forward({}, x, rng=np.random.default_rng(3))
    assert np.array_equal(again, out)  # the same generator state, the same mask
    grads = module.backward({}, cache, np.full_like(x, 2.0))
    assert np.array_equal(grads["x"], 2 * mask / 0.7)  # backward reads the kept mask
    assert np.array_equal(module.predict({}, x), x)  # evaluation: the identity


def test_dropout_toml_and_its_errors():
    spec = """
input = { features = 4 }
loss = "mse"
[[layers]]
type = "dropout"
name = "drop"
%s
"""
    assert symbp.parse_spec(spec % "").placed[0].layer.p == 0.5  # F.dropout's default
    net = symbp.parse_spec(spec % "p = 0.2")
    assert net.placed[0].layer.p == 0.2 and check_spec(net, batch=3, seed=0).passed
    for bad, said in (("p = 1", "must be below 1"), ("p = -0.1", "must be at least 0"),
                      ('p = "half"', "must be a number"), ("rate = 0.1", "unknown field")):
        with pytest.raises(SpecError, match=f"layer 'drop'.*{said}"):
            symbp.parse_spec(spec % bad)


def test_dropout_flow_bound_is_the_inverted_scale():
    """f' is m/(1 - p) with the mask m in {0, 1}: sup |f'| = 1/(1 - p), a number (before,
    sympy left |AccumBounds(0, 1)| unevaluated and the bound was a maximum over the mask)."""
    from symbp.flow.chain import flow_bounds

    net = Net([symbp.dropout(p=0.3)], input_features=3, loss="mse")
    (row,) = flow_bounds(symbp.derive(net))
    assert row.bound == sympy.Rational(10, 7)


# --------------------------------------------------------------------------- random mixtures
# Hypothesis draws networks that mix the canon layers with each other and with the older ones
# (residual blocks, activations, convolutions): every draw agrees with PyTorch and passes check.

from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from symbp.errors import SymbpError  # noqa: E402


@st.composite
def feature_nets(draw):
    width = draw(st.integers(2, 5))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["linear", "layer_norm", "softmax", "log_softmax",
                                     "dropout", "residual"]))
        if kind == "linear":
            width = draw(st.integers(2, 5))
            layers.append(symbp.linear(width, bias=draw(st.booleans())))
            layers.append(draw(st.sampled_from([symbp.gelu, symbp.tanh, symbp.relu]))())
        elif kind == "layer_norm":
            layers.append(symbp.layer_norm(eps=draw(st.sampled_from([1e-5, 0.1]))))
        elif kind == "dropout":
            layers.append(symbp.dropout(p=draw(st.sampled_from([0.0, 0.25, 0.5]))))
        elif kind == "residual":
            body = [symbp.layer_norm(), symbp.linear(width)]
            if draw(st.booleans()):
                body.insert(1, draw(st.sampled_from([symbp.softmax, symbp.gelu]))())
            layers.append(symbp.residual(body))
        else:
            layers.append(getattr(symbp, kind)())
    layers.append(symbp.linear(draw(st.integers(2, 3))))
    loss = draw(st.sampled_from(["mse", "softmax_cross_entropy"]))
    try:
        net = Net(layers, input_features=draw(st.integers(2, 5)), loss=loss)
    except SymbpError:
        assume(False)
    note(" -> ".join(item.layer.describe() for item in net.placed))
    return net


@st.composite
def image_nets(draw):
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(3, 6))
    out = draw(st.sampled_from([2, 4, 6]))
    layers = [symbp.conv2d(out, draw(st.integers(1, 3)), padding=draw(st.integers(0, 1)))]
    norm = draw(st.sampled_from(["group_norm", "layer_norm", "none"]))
    if norm == "group_norm":
        layers.append(symbp.group_norm(draw(st.sampled_from([d for d in (1, 2, out)
                                                             if out % d == 0]))))
    elif norm == "layer_norm":
        layers.append(symbp.layer_norm())
    layers.append(draw(st.sampled_from([symbp.relu, symbp.gelu, symbp.tanh]))())
    if draw(st.booleans()):
        layers.append(symbp.dropout(p=0.3))
    layers.append(draw(st.sampled_from([symbp.global_avgpool, symbp.flatten]))())
    layers.append(symbp.linear(draw(st.integers(2, 3))))
    if draw(st.booleans()):
        layers.append(draw(st.sampled_from([symbp.softmax, symbp.log_softmax]))())
    try:
        net = Net(layers, input_shape=(channels, size, size),
                  loss=draw(st.sampled_from(["mse", "softmax_cross_entropy"])))
    except SymbpError:
        assume(False)
    note(" -> ".join(item.layer.describe() for item in net.placed))
    return net


def _mixture_case(net, seed):
    assert_agrees_with_torch(net, batch=4, seed=seed)
    report = check_spec(net, batch=3, seed=seed)
    assert report.passed, report.table()


_DRAWS = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# A few draws in the default run, the full number with -m slow (CI).
@settings(max_examples=3, **_DRAWS)
@given(st.one_of(feature_nets(), image_nets()), st.integers(0, 2**16))
def test_a_few_random_canon_mixtures_agree_with_torch_and_pass_check(net, seed):
    _mixture_case(net, seed)


@pytest.mark.slow
@settings(max_examples=25, **_DRAWS)
@given(st.one_of(feature_nets(), image_nets()), st.integers(0, 2**16))
def test_random_canon_mixtures_agree_with_torch_and_pass_check(net, seed):
    _mixture_case(net, seed)
