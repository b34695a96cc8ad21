"""Convolutional layers (issue #5), each proved right against a truth that is not symbp's own.

* the derived backward of conv2d (plain, padded, strided, dilated, without bias), max and
  average pooling, flatten and 4-D batch norm equals direct differentiation of the fully
  expanded scalar forward at small concrete sizes (the engine's own verifier, independent of
  the whole-array lowering);
* generated modules agree with an oracle written here in ``autograd.numpy`` straight from the
  definitions (cross-correlation as a sum over kernel offsets of strided slices, pooling as a
  max or mean over stacked slices), differentiated by HIPS autograd, to 1e-10;
* they agree with PyTorch's Conv2d / MaxPool2d / AvgPool2d / BatchNorm2d where it is installed
  (semantics: first arg-max on ties, zero padding counted in averages, running statistics);
* ``symbp check`` passes on every conv example and on hypothesis-drawn small conv nets;
* shape mistakes are declaration errors; ``symbp derive`` says what the gradients are.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import symbp
from symbp.checking.gradcheck import check_spec, load_module, make_inputs
from symbp.cli import main as cli_main
from symbp.declare.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from symbp.declare.layers import BatchNorm
from symbp.declare.net import Net
from symbp.declare.spec import load_spec
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import default_sizes, verify_layer
from symbp.emit.module import generate_module
from symbp.errors import SymbpError

anp = pytest.importorskip("autograd.numpy")
autograd = pytest.importorskip("autograd")

ROOT = Path(__file__).resolve().parent.parent
CONV_EXAMPLES = [ROOT / "examples" / "lenet.toml", ROOT / "examples" / "cnn_bn.toml"]
TOLERANCE = 1e-10


# --------------------------------------------------------------------------- symbolic proofs


def _sizes(derivation, **override):
    sizes = default_sizes(derivation.form)
    for symbol in list(sizes):
        if symbol.name in override:
            sizes[symbol] = override[symbol.name]
    for symbol, rule in derivation.form.size_rules.items():
        sizes[symbol] = int(rule.xreplace(sizes))
    return sizes


@pytest.mark.parametrize(
    "layer",
    [
        Conv2d(2, 2),
        Conv2d(2, 2, padding=1, stride=2),
        pytest.param(Conv2d(2, 2, dilation=2), marks=pytest.mark.slow),
        Conv2d(2, [2, 1], bias=False, stride=2),
        MaxPool2d(2),
        # overlapping windows: the slowest expansion here (about 10 s); CI runs it
        pytest.param(MaxPool2d(2, stride=1), marks=pytest.mark.slow),
        AvgPool2d(2, padding=1),
        Flatten(),
    ],
    ids=lambda layer: layer.describe(),
)
def test_derivation_equals_direct_scalar_differentiation(layer):
    derivation = derive_layer(layer.forward_form((2, 4, 4)))
    results = verify_layer(derivation, _sizes(derivation))
    assert results and all(r.proven for r in results), [(r.name, r.detail) for r in results]


def test_batchnorm_per_channel_equals_direct_scalar_differentiation():
    derivation = derive_layer(BatchNorm().forward_form((2, 2, 2)))
    results = verify_layer(derivation, _sizes(derivation, N=2, C=1, H_in=2, W_in=1))
    assert {r.name for r in results} == {"dx", "dgamma", "dbeta"}
    assert all(r.proven for r in results), [(r.name, r.detail) for r in results]


def test_a_wrong_formula_is_not_proven():
    """The verifier can fail: the input gradient with the kernel not flipped is refused."""
    derivation = derive_layer(Conv2d(1, 2).forward_form((1, 3, 3)))
    adjoint = derivation.vjp["x"]
    # Reading the kernel the other way round (W[o, c, K_h-1-k, ...]) is the classic mistake.
    weight = derivation.form.arrays["W"]
    kh = weight.dims[2]
    wrong = adjoint.expr.replace(
        lambda e: getattr(e, "base", None) == weight.base,
        lambda e: weight.base[e.indices[0], e.indices[1], kh - 1 - e.indices[2], e.indices[3]],
    )
    assert wrong != adjoint.expr
    derivation.vjp["x"] = type(adjoint)(adjoint.array, adjoint.indices, wrong)
    try:
        results = verify_layer(derivation, _sizes(derivation))
    finally:
        derivation.vjp["x"] = adjoint
    assert not next(r for r in results if r.name == "dx").proven


# --------------------------------------------------------------------------- the oracle


def _pad(h, padding):
    if not padding:
        return h
    return anp.pad(h, ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode="constant")


def _windows(h, kernel, stride, dilation, rows, columns):
    """Each kernel offset's strided slice: ``out[i, j][n, c, p, q] = h[n, c, p*S + i*D, ...]``."""
    return [
        [
            h[:, :, i * dilation : i * dilation + stride * (rows - 1) + 1 : stride,
              j * dilation : j * dilation + stride * (columns - 1) + 1 : stride]
            for j in range(kernel[1])
        ]
        for i in range(kernel[0])
    ]


def oracle_layer(item, params, h, *, train, state):
    layer, kind = item.layer, item.layer.kind
    out_rows, out_columns = item.out_shape[-2:] if len(item.out_shape) == 3 else (0, 0)
    if kind == "conv2d":
        weight = params[f"{item.name}.W"]
        hp = _pad(h, layer.padding)
        slices = _windows(hp, layer.kernel, layer.stride[0], layer.dilation[0], out_rows,
                          out_columns)
        y = sum(
            anp.einsum("ncpq,oc->nopq", slices[i][j], weight[:, :, i, j])
            for i in range(layer.kernel[0])
            for j in range(layer.kernel[1])
        )
        if layer.bias:
            y = y + params[f"{item.name}.b"][None, :, None, None]
        return y
    if kind in ("maxpool2d", "avgpool2d"):
        hp = _pad(h, layer.padding)
        slices = _windows(hp, layer.kernel, layer.stride[0], 1, out_rows, out_columns)
        stacked = anp.stack([s for row in slices for s in row])
        return anp.max(stacked, axis=0) if kind == "maxpool2d" else anp.mean(stacked, axis=0)
    if kind == "flatten":
        return anp.reshape(h, (h.shape[0], -1))
    if kind == "batchnorm":
        axes = (0,) if h.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if h.ndim == 2 else (1, -1, 1, 1)
        if train:
            mean = anp.mean(h, axis=axes, keepdims=True)
            var = anp.mean((h - mean) ** 2, axis=axes, keepdims=True)
        else:
            mean = anp.reshape(state[f"{item.name}.running_mean"], shape)
            var = anp.reshape(state[f"{item.name}.running_var"], shape)
        gamma = anp.reshape(params[f"{item.name}.gamma"], shape)
        beta = anp.reshape(params[f"{item.name}.beta"], shape)
        return gamma * (h - mean) / anp.sqrt(var + layer.eps) + beta
    if kind == "linear":
        return h @ params[f"{item.name}.W"] + params[f"{item.name}.b"]
    if kind == "relu":
        return anp.where(h > 0, h, 0.0)
    if kind == "leaky_relu":
        return anp.where(h > 0, h, layer.slope * h)
    if kind == "tanh":
        return anp.tanh(h)
    raise AssertionError(f"no oracle for {kind}")


def oracle_forward(net: Net, params, x, *, train=True, state=None):
    h = x
    for item in net.placed:
        h = oracle_layer(item, params, h, train=train, state=state)
    return h


def oracle_loss(net: Net, params, x, y):
    out = oracle_forward(net, params, x)
    if net.loss.kind == "mse":
        return anp.mean((out - y) ** 2)
    shifted = out - anp.max(out, axis=1, keepdims=True)
    log_probs = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
    return -anp.mean(log_probs[np.arange(len(y)), y])


def force_route(module, route):
    """Make the module's window products take one route: "banded" wherever it applies,
    "im2col" everywhere ("chunked": one sample at a time), or (None) the cheaper one by the
    helpers' own cost model and chunk size."""
    if route is None or not hasattr(module, "_shift"):
        return
    if route == "chunked":
        module._CHUNK_BYTES = 1
    module.shift_calls = []  # the banded route builds its shift tensors with _shift
    shift = module._shift
    module._shift = lambda *args: module.shift_calls.append(args) or shift(*args)
    applies = {"j", "q"}
    if route == "banded":
        module._banded_window_route = lambda size, shape, width, summed: (
            next(iter(applies & set(summed))) if len(applies & set(summed)) == 1 else None)
        module._cheaper_banded_scatter = lambda *args: True
    else:
        module._banded_window_route = lambda *args: None
        module._cheaper_banded_scatter = lambda *args: False


def assert_agrees_with_oracle(net: Net, *, batch=3, seed=0, route=None):
    module = load_module(generate_module(net))
    force_route(module, route)
    params, x, y = make_inputs(net, module, batch=batch, seed=seed)
    loss, grads = module.loss_and_grads(params, x, y)
    names = sorted(params)

    def of(values, x):
        return oracle_loss(net, dict(zip(names, values, strict=True)), x, y)

    expected_loss = of([params[n] for n in names], x)
    expected = dict(zip(names, autograd.grad(of, 0)([params[n] for n in names], x), strict=True))
    expected["x"] = autograd.grad(of, 1)([params[n] for n in names], x)
    assert abs(loss - expected_loss) <= TOLERANCE * abs(expected_loss)
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    errors = {}
    for name, value in expected.items():
        floor = max(float(np.max(np.abs(value))), 1e-2 * scale)
        errors[name] = float(np.max(np.abs(grads[name] - value))) / floor
    assert max(errors.values()) < TOLERANCE, errors
    return module, params, x, y


CONV_NETS = {
    "plain": lambda: Net([symbp.conv2d(3, 3), symbp.relu(), symbp.flatten(), symbp.linear(3)],
                         input_shape=(2, 6, 6), loss="mse"),
    "padded_strided_dilated": lambda: Net(
        [symbp.conv2d(3, 3, stride=2, padding=1, dilation=2), symbp.tanh(), symbp.flatten(),
         symbp.linear(4)], input_shape=(1, 9, 8), loss="softmax_cross_entropy"),
    "rectangular_nobias": lambda: Net(
        [symbp.conv2d(2, [2, 3], bias=False), symbp.leaky_relu(), symbp.flatten(),
         symbp.linear(3)], input_shape=(3, 5, 6), loss="mse"),
    "pools": lambda: Net(
        [symbp.conv2d(2, 2), symbp.maxpool2d(2), symbp.leaky_relu(), symbp.avgpool2d(2, stride=1,
         padding=1), symbp.flatten(), symbp.linear(3)], input_shape=(1, 9, 9),
        loss="softmax_cross_entropy"),
    "batchnorm2d": lambda: Net(
        [symbp.conv2d(3, 3, padding=1), symbp.batchnorm(), symbp.relu(), symbp.maxpool2d(2),
         symbp.flatten(), symbp.batchnorm(), symbp.linear(3)], input_shape=(2, 6, 6),
        loss="softmax_cross_entropy"),
    # "Same" convolutions with no more output than input channels: their input gradients are
    # computed as full convolutions (a gather), one with a kernel of width 1 (the padded
    # upstream gradient is cropped on that axis), one 1x1.
    "gather": lambda: Net(
        [symbp.conv2d(3, 3, padding=1), symbp.tanh(), symbp.conv2d(2, [3, 1], padding=1),
         symbp.leaky_relu(), symbp.conv2d(2, 1), symbp.flatten(), symbp.linear(3)],
        input_shape=(3, 6, 6), loss="softmax_cross_entropy"),
}


def test_the_nets_cover_every_image_layer_type():
    covered = {item.layer.kind for build in CONV_NETS.values() for item in build().placed}
    assert {"conv2d", "maxpool2d", "avgpool2d", "flatten", "batchnorm"} <= covered


#: The net every route of the window products runs on by default; the others run each route with
#: -m slow (their default route runs by default too).
EVERY_ROUTE_NET = "padded_strided_dilated"


@pytest.mark.parametrize("name, route", [
    pytest.param(name, route, marks=() if route is None or name == EVERY_ROUTE_NET
                 else pytest.mark.slow)
    for name in sorted(CONV_NETS) for route in (None, "banded", "im2col", "chunked")
])
def test_generated_conv_nets_agree_with_autograd(name, route):
    """On either route of the window products (and the one their cost model picks), and on
    im2col a sample at a time."""
    module, *_ = assert_agrees_with_oracle(CONV_NETS[name](), route=route)
    assert hasattr(module, "_window_tensordot")
    if route is not None:
        assert bool(module.shift_calls) == (route == "banded")


@pytest.mark.parametrize("name", sorted(CONV_NETS))
def test_generated_conv_nets_pass_check(name):
    report = check_spec(CONV_NETS[name](), batch=3, seed=1)
    assert report.passed, report.table()


@pytest.mark.parametrize("spec", CONV_EXAMPLES, ids=lambda p: p.stem)
def test_conv_examples_agree_with_autograd(spec):
    assert_agrees_with_oracle(load_spec(spec), batch=2)


def test_evaluation_mode_uses_the_running_statistics_per_channel():
    net = CONV_NETS["batchnorm2d"]()
    module = load_module(generate_module(net))
    params, x, _ = make_inputs(net, module, batch=4, seed=3)
    state = module.init_state()
    module.forward(params, x, train=True, state=state)
    assert state["batchnorm2.running_mean"].shape == (3,)
    predicted = module.predict(params, x, state)
    expected = oracle_forward(net, params, x, train=False, state=state)
    np.testing.assert_allclose(predicted, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- PyTorch semantics


def test_same_numbers_as_pytorch():
    torch = pytest.importorskip("torch")
    net = Net(
        [symbp.conv2d(4, 3, stride=2, padding=1, dilation=1, name="c1"),
         symbp.batchnorm(name="bn"), symbp.relu(), symbp.maxpool2d(2, name="mp"),
         symbp.conv2d(3, 2, dilation=2, padding=1, name="c2"), symbp.avgpool2d(2, padding=1,
         name="ap"), symbp.flatten(), symbp.linear(5, name="fc")],
        input_shape=(3, 11, 11), loss="softmax_cross_entropy")
    module = load_module(generate_module(net))
    params, x, y = make_inputs(net, module, batch=4, seed=5)
    # Exact ties in a pooling window (after ReLU, zeros): PyTorch sends the gradient to the
    # first maximum, as symbp's convention does.
    state = module.init_state()
    loss, grads = module.loss_and_grads(params, x, y, state=state)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    bn = torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(t["bn.gamma"])
        bn.bias.copy_(t["bn.beta"])
    h = torch.nn.functional.conv2d(tx, t["c1.W"], t["c1.b"], stride=2, padding=1)
    h = torch.nn.functional.batch_norm(h, bn.running_mean, bn.running_var, t["bn.gamma"],
                                       t["bn.beta"], training=True, momentum=0.1, eps=1e-5)
    h = torch.nn.functional.max_pool2d(torch.relu(h), 2)
    h = torch.nn.functional.conv2d(h, t["c2.W"], t["c2.b"], padding=1, dilation=2)
    h = torch.nn.functional.avg_pool2d(h, 2, padding=1)
    out = h.flatten(1) @ t["fc.W"] + t["fc.b"]
    expected = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    expected.backward()
    assert abs(loss - expected.item()) < 1e-12 * abs(loss)
    for name in params:
        np.testing.assert_allclose(grads[name], t[name].grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state["bn.running_mean"], bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(state["bn.running_var"], bn.running_var.numpy(), rtol=1e-12)


def test_max_pooling_routes_a_tie_to_the_first_maximum():
    net = Net([symbp.maxpool2d(2), symbp.flatten()], input_shape=(1, 2, 4), loss=None)
    module = load_module(generate_module(net))
    x = np.array([[[[1.0, 1.0, 0.0, 2.0], [0.5, 1.0, 2.0, 2.0]]]])
    out, cache = module.forward({}, x)
    np.testing.assert_array_equal(out, [[1.0, 2.0]])
    grads = module.backward({}, cache, np.array([[10.0, 20.0]]))
    # Row-major first maximum in each 2x2 window: (0, 0) and (0, 3).
    np.testing.assert_array_equal(grads["x"], [[[[10.0, 0, 0, 20.0], [0, 0, 0, 0]]]])


# --------------------------------------------------------------------------- random conv nets


@st.composite
def conv_nets(draw):
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(5, 9))
    layers = []
    for _ in range(draw(st.integers(1, 2))):
        layers.append(symbp.conv2d(
            draw(st.integers(1, 3)),
            [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, 1)),
            dilation=draw(st.integers(1, 2)),
            bias=draw(st.booleans()),
        ))
        if draw(st.booleans()):
            layers.append(symbp.batchnorm())
        layers.append(draw(st.sampled_from([symbp.tanh, symbp.leaky_relu]))())
        pool = draw(st.sampled_from(["none", "max", "avg"]))
        if pool == "max":
            layers.append(symbp.maxpool2d(2, stride=draw(st.integers(1, 2))))
        elif pool == "avg":
            layers.append(symbp.avgpool2d(2, stride=draw(st.integers(1, 2)),
                                          padding=draw(st.integers(0, 1))))
    layers += [symbp.flatten(), symbp.linear(draw(st.integers(1, 3)))]
    loss = draw(st.sampled_from(["mse", "softmax_cross_entropy"]))
    try:
        net = Net(layers, input_shape=(channels, size, size), loss=loss)
    except SymbpError:
        assume(False)
    note(" -> ".join(item.layer.describe() for item in net.placed))
    return net


def _random_conv_net_case(net, seed, route):
    assert_agrees_with_oracle(net, batch=3, seed=seed, route=route)
    report = check_spec(net, batch=3, seed=seed)
    assert report.passed, report.table()


# A few draws in the default run, the full number with -m slow (CI).
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_nets(), st.integers(0, 2**16),
       st.sampled_from([None, "banded", "im2col", "chunked"]))
def test_a_few_random_conv_nets_agree_with_autograd_and_pass_check(net, seed, route):
    _random_conv_net_case(net, seed, route)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_nets(), st.integers(0, 2**16),
       st.sampled_from([None, "banded", "im2col", "chunked"]))
def test_random_conv_nets_agree_with_autograd_and_pass_check(net, seed, route):
    _random_conv_net_case(net, seed, route)


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("layers", "shape", "message"),
    [
        (
            [symbp.conv2d(2, 7)],
            (1, 5, 5),
            r"'kernel': kernel 7 is larger than the padded input height 5",
        ),
        (
            [symbp.conv2d(2, 3, dilation=3)],
            (1, 5, 5),
            r"'kernel': kernel 3 \(dilated 7\) is larger than the padded input height 5",
        ),
        ([symbp.conv2d(2, 3, in_channels=2)], (1, 5, 5), "input channels"),
        ([symbp.maxpool2d(3)], (4,), "expects images"),
        ([symbp.conv2d(2, 3), symbp.linear(3)], (1, 5, 5), "flatten"),
    ],
)
def test_shape_mistakes_are_declaration_errors(layers, shape, message):
    with pytest.raises(SymbpError, match=message):
        Net(layers, input_shape=shape, loss="mse")


def test_pooling_options_pytorch_refuses_are_declaration_errors():
    # the default stride is the kernel: per axis for a rectangular one, which is not supported
    with pytest.raises(SymbpError, match=r"rectangular kernel \[2, 3\] needs a stride"):
        symbp.maxpool2d([2, 3])
    assert symbp.maxpool2d([2, 3], stride=2).stride == (2, 2)
    # a window wholly in the padding (PyTorch: "pad should be at most half of kernel size")
    with pytest.raises(SymbpError, match=r"'padding': must be at most half the kernel \[2, 2\]"):
        symbp.avgpool2d(2, padding=2)
    assert symbp.avgpool2d(3, padding=1).padding == 1


def test_an_input_shape_that_is_neither_features_nor_an_image_is_a_declaration_error():
    said = r"'input': must be features \[F\], a sequence \[T, D\] or an image"
    with pytest.raises(SymbpError, match=said):
        Net([symbp.relu()], input_shape=(1, 3, 4, 4), loss="mse")


def test_spec_file_with_a_kernel_too_large_exits_2(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(textwrap.dedent("""\
        name = "bad"
        input = { shape = [1, 4, 4] }
        loss = "mse"

        [[layers]]
        type = "conv2d"
        name = "c"
        out_channels = 2
        kernel = 5
        """))
    assert cli_main(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "c" in err and "kernel" in err
    assert "Traceback" not in err


def test_derive_says_what_the_conv_gradients_are(capsys):
    assert cli_main(["derive", str(CONV_EXAMPLES[0]), "--layer", "conv1"]) == 0
    out = capsys.readouterr().out
    assert "full convolution of dy with the flipped kernel W" in out
    assert "correlation of x with dy" in out
    assert cli_main(["derive", str(CONV_EXAMPLES[0]), "--layer", "pool1"]) == 0
    assert "arg-max" in capsys.readouterr().out


def _first_statement(lines: list[str]) -> str:
    """The statement the first of ``lines`` starts (it may go on over the next lines)."""
    for end in range(1, len(lines) + 1):
        try:
            ast.parse(" ".join(lines[:end]))
        except SyntaxError:
            continue
        return " ".join(lines[:end])
    raise AssertionError(f"no statement in {lines[:3]}")


def test_derive_shows_array_code_that_computes_the_input_gradient(capsys):
    """cnn_bn's conv2 (16 -> 16 channels, padding 1) gathers (no scatter-add runs), its conv1
    (3 -> 16) scatters: the ``dx = ...`` code derive prints for each, run with the module's
    helpers, computes the
    input gradient of its definition, dx[n, c, h, w] = sum W[o, c, i, j] dy[n, o, p, q] over
    h = p + i - padding, w = q + j - padding."""
    net = load_spec(CONV_EXAMPLES[1])
    module = load_module(generate_module(net))
    rng = np.random.default_rng(4)
    for layer in ("conv2", "conv1"):
        item = next(item for item in net.walk() if item.name == layer)
        (channels, height, width), conv = item.in_shape, item.layer
        out, k, pad = conv.out_channels, conv.kernel[0], conv.padding
        assert cli_main(["derive", str(CONV_EXAMPLES[1]), "--layer", layer]) == 0
        lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
        code = _first_statement(lines[next(i for i, x in enumerate(lines)
                                           if x.startswith("dx = ")):])
        W = rng.standard_normal((out, channels, k, k))
        rows, columns = height + 2 * pad - k + 1, width + 2 * pad - k + 1
        dy = rng.standard_normal((2, out, rows, columns))
        scope = {**vars(module), "W": W, "dy": dy, "padding": pad, "K_h": k, "K_w": k,
                 "H_in": height, "W_in": width}
        scatters = []  # the col2im helpers (a scatter-add) the printed code calls
        for name in [name for name in scope if "col2im" in name]:
            scope[name] = lambda *a, _name=name, _helper=scope[name], _seen=scatters, **kw: (
                _seen.append(_name), _helper(*a, **kw))[1]
        exec(code, scope)  # noqa: S102 - symbp's own printed code
        assert bool(scatters) == (layer == "conv1"), (layer, scatters)  # conv2 gathers
        padded = np.zeros((2, channels, height + 2 * pad, width + 2 * pad))
        for i, j in np.ndindex(k, k):
            padded[:, :, i:i + rows, j:j + columns] += np.einsum("nopq,oc->ncpq", dy, W[:, :, i, j])
        expected = padded[:, :, pad:pad + height, pad:pad + width]
        np.testing.assert_allclose(scope["dx"], expected, rtol=1e-10, atol=1e-12, err_msg=layer)


def test_strided_input_gradient_is_read_as_a_transposed_convolution(capsys):
    assert cli_main(["derive", str(CONV_EXAMPLES[1]), "--layer", "conv3"]) == 0
    assert "transposed (strided) convolution" in capsys.readouterr().out


@pytest.mark.parametrize(
    "layer, in_shape, gathers",
    [
        (Conv2d(16, 3, padding=1), (16, 32, 32), True),  # VGG-style: as many outputs as inputs
        (Conv2d(8, 3, padding=1), (16, 32, 32), True),
        (Conv2d(32, 3, padding=1), (16, 32, 32), False),  # twice the channels: scatter
        (Conv2d(16, 3, padding=1), (3, 32, 32), False),  # a first layer on colour images
        (Conv2d(16, 5), (6, 12, 12), False),  # LeNet's conv2: 8x8 outputs of 12x12 inputs
        (Conv2d(4, 5), (16, 12, 12), True),
        (Conv2d(16, 3, padding=1, stride=2), (16, 32, 32), False),  # strided: scatter
        (Conv2d(16, 3, padding=2, dilation=2), (16, 32, 32), False),  # dilated: scatter
    ],
)
def test_the_input_gradient_is_gathered_when_its_windows_are_no_bigger(layer, in_shape, gathers):
    """Gather: O*K*K window rows per input pixel; scatter: C*K*K column rows per output pixel."""
    assert layer.gathers_input_grad(in_shape) is gathers
    assert layer.forward_form(in_shape).gather is gathers


def test_a_gathered_input_gradient_equals_the_scattered_one():
    """The same convolution's backward, computed both ways in one module, agrees to rounding;
    both share one forward function (their forward passes read the same)."""
    net = Net([symbp.conv2d(4, 3, padding=1), symbp.relu(), symbp.conv2d(4, 3, padding=1),
               symbp.flatten(), symbp.linear(2)], input_shape=(2, 7, 5), loss="mse")
    source = generate_module(net)
    module = load_module(source)
    tree = ast.parse(source)
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "conv2d_padded_backward" in defined  # 2 -> 4 channels: scatter
    assert "conv2d_padded_gather_backward" in defined  # 4 -> 4 channels: gather
    assert "conv2d_padded_gather_forward" not in defined
    called = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert called.count("conv2d_padded_forward") == 2
    # the reading of the docstring is the feature here: the text is what a reader gets
    assert "a full convolution of dy with the flipped kernel W" in (
        module.conv2d_padded_gather_backward.__doc__)
    rng = np.random.default_rng(3)
    xp = rng.standard_normal((3, 4, 9, 7))
    W, dy = rng.standard_normal((4, 4, 3, 3)), rng.standard_normal((3, 4, 7, 5))
    scatters = []  # the col2im helpers (a scatter-add) that run, by name
    for name in [name for name in vars(module) if "col2im" in name]:
        helper = getattr(module, name)
        setattr(module, name, lambda *a, _name=name, _helper=helper, **k: (
            scatters.append(_name), _helper(*a, **k))[1])
    scattered = module.conv2d_padded_backward(dy, xp, W, padding=1)
    assert scatters
    scatters.clear()
    gathered = module.conv2d_padded_gather_backward(dy, xp, W, padding=1)
    assert scatters == []  # gathered: no scatter-add
    for a, b in zip(scattered, gathered, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-12)
    # The input gradient itself, entry by entry from the formula dx = sum W * dy.
    dx = np.zeros((3, 4, 7, 5))
    for o, c, i, j, p, q in np.ndindex(4, 4, 3, 3, 7, 5):
        h, w = p + i - 1, q + j - 1
        if 0 <= h < 7 and 0 <= w < 5:
            dx[:, c, h, w] += W[o, c, i, j] * dy[:, o, p, q]
    assert np.allclose(gathered[0], dx, rtol=0, atol=1e-12)


def _lines_run(module, params, x, y) -> int:
    """How many lines of Python ``module``'s code (its helpers included) runs for one
    ``loss_and_grads``."""
    import sys

    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def tracer(frame, event, arg):
        return local if frame.f_globals is module.__dict__ else None

    sys.settrace(tracer)
    try:
        module.loss_and_grads(params, x, y)
    finally:
        sys.settrace(None)
    return count


def test_generated_conv_module_has_no_python_loop_over_pixels_or_batch():
    """The Python lines a training step of cnn_bn runs (loops over kernel offsets, axes and
    chunks included) are as many for 2 images as for 5, and for 16x16 images as for 32x32:
    no Python loop runs over the batch or the pixels."""
    text = CONV_EXAMPLES[1].read_text(encoding="utf-8")
    assert "shape = [3, 32, 32]" in text
    counts = set()
    for size, batch in ((16, 2), (16, 5), (32, 2), (32, 5)):
        net = symbp.parse_spec(text.replace("shape = [3, 32, 32]", f"shape = [3, {size}, {size}]"))
        module = load_module(generate_module(net), f"cnn_bn_{size}_{batch}")
        params, x, y = make_inputs(net, module, batch=batch, seed=0)
        module.loss_and_grads(params, x, y)  # first calls (imports, caches) not counted
        counts.add(_lines_run(module, params, x, y))
    assert len(counts) == 1 and counts.pop() > 100


@pytest.mark.parametrize("name", ["pools", "batchnorm2d", "gather", "padded_strided_dilated"])
def test_helper_threads_give_the_same_bits(name):
    """set_threads(2) cuts the helpers' work along the batch into parts run on two threads (here
    with parts of 64 elements, so that a small net is cut too): same loss, same gradients, to
    the bit; and the parts really ran in more than one thread."""
    source = generate_module(CONV_NETS[name]())
    serial, parted = load_module(source, f"{name}_serial"), load_module(source, f"{name}_parted")
    assert "set_threads(count)" in parted.__doc__
    parted._PART_SIZE = 64
    threads = set()
    in_parts = parted._in_parts

    def recording(work, out):
        def recorded(part):
            threads.add(threading.get_ident())
            work(part)

        in_parts(recorded, out)

    parted._in_parts = recording
    parted.set_threads(2)
    try:
        rng = np.random.default_rng(7)
        params = serial.init_params(seed=3)
        x = rng.standard_normal((9, *CONV_NETS[name]().input_shape))
        y = rng.integers(0, 3, size=9) if "softmax" in source else rng.standard_normal((9, 3))
        loss, grads = serial.loss_and_grads(params, x, y, state=serial.init_state())
        loss2, grads2 = parted.loss_and_grads(params, x, y, state=parted.init_state())
    finally:
        parted.set_threads(1)
    assert loss2 == loss
    assert grads2.keys() == grads.keys()
    assert all(np.array_equal(grads2[k], grads[k]) for k in grads)
    assert len(threads) == 2


def test_a_module_without_array_helpers_has_no_thread_pool():
    """Its set_threads (every module has one, tests/test_module_io.py) starts no threads."""
    source = generate_module(Net([symbp.linear(3), symbp.relu(), symbp.linear(2)],
                                 input_features=4, loss="mse"))
    assert "_PARTS" not in source and "import concurrent" not in source
    assert "def set_threads(count):" in source


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_conv_modules_are_ruff_clean(tmp_path):
    """Long window expressions are wrapped (inside brackets) to the project's line length."""
    for name in ("padded_strided_dilated", "pools", "batchnorm2d", "gather"):
        (tmp_path / f"{name}.py").write_text(generate_module(CONV_NETS[name]()), encoding="utf-8")
    (tmp_path / "cnn_bn.py").write_text(generate_module(load_spec(CONV_EXAMPLES[1])),
                                        encoding="utf-8")
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout


def test_channel_batchnorm_backward_keeps_float32_accuracy_over_many_values():
    """Per-channel statistics over N*H*W = 65536 values, an upstream gradient with a large
    mean (which the backward's sums subtract out again): float32 still computes what float64
    does, to float32 accuracy (the rounding of dy itself, about 1e-7 * 100, bounds the
    difference)."""
    net = Net([symbp.batchnorm()], input_shape=(2, 32, 32), loss=None)
    module = load_module(generate_module(net))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 2, 32, 32))  # 65536 values per channel
    dy = 100.0 + rng.standard_normal(x.shape)  # mean 100, spread 1
    params = {k: v + 0.1 for k, v in module.init_params().items()}
    out64, cache64 = module.forward(params, x)
    exact = module.backward(params, cache64, dy)["x"]
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    _, cache32 = module.forward(params32, x.astype(np.float32))
    got = module.backward(params32, cache32, dy.astype(np.float32))["x"]
    assert got.dtype == np.float32
    assert np.max(np.abs(got - exact)) < 1e-4 * np.max(np.abs(exact))


@pytest.mark.parametrize("input_shape", [(2, 25, 32), None])
def test_batchnorm_backward_builds_dx_in_one_array_without_scaling_dy_by_the_count(input_shape):
    """k*(count*dy - c*xhat - s) as (k*count)*(dy - (c/count)*xhat - s/count): one new array,
    built in place (the backward's peak memory is about one dx), for per-channel statistics
    (count = N*H*W) as for per-feature ones; dy is never multiplied by the count (float32 dy
    near 1e36, count 2000 or 25600: count*dy would overflow to inf)."""
    import tracemalloc

    layers = [symbp.batchnorm()]
    net = (Net(layers, input_shape=input_shape, loss=None) if input_shape
           else Net(layers, input_features=64, loss=None))
    module = load_module(generate_module(net))
    rng = np.random.default_rng(11)
    # 2000 and 25600 values per statistic; dx of 1 MB and 410 kB, beside which the vectors (and
    # _along_rows's repeated vector, at most 64 kB) are small
    shape = (32, *input_shape) if input_shape else (2000, 64)
    x = rng.standard_normal(shape)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in module.init_params().items()}
    gamma = params[next(k for k in params if k.endswith("gamma"))]
    axes = (0, 2, 3) if input_shape else (0,)
    along = (slice(None), None, None) if input_shape else (slice(None),)

    def textbook(dy):  # float64, from the definition of the batch-norm input gradient
        count = x.size // x.shape[1]
        xhat = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
            x.var(axis=axes, keepdims=True) + 1e-5)
        return (gamma[along] / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5) / count
                * (count * dy - dy.sum(axis=axes, keepdims=True)
                   - xhat * (dy * xhat).sum(axis=axes, keepdims=True)))

    _, cache = module.forward(params, x)
    dy = rng.standard_normal(shape)
    module.backward(params, cache, dy)
    tracemalloc.start()
    try:
        dx = module.backward(params, cache, dy)["x"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(dx, textbook(dy), rtol=1e-9, atol=1e-12)
    assert dx.nbytes <= peak < 1.5 * dx.nbytes

    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    _, cache32 = module.forward(params32, x.astype(np.float32))
    huge = (1e36 * rng.choice([-1.0, 1.0], size=shape)).astype(np.float32)
    dx32 = module.backward(params32, cache32, huge)["x"]
    assert dx32.dtype == np.float32 and np.all(np.isfinite(dx32))
    expected = textbook(huge.astype(np.float64))
    assert np.max(np.abs(dx32 - expected)) < 1e-4 * np.max(np.abs(expected))


def test_the_gradient_out_of_pooling_is_reused_by_the_next_layer_back():
    """Max-pooling's input gradient is a cropped view of a new array: the ReLU before the pool
    may compute in it (``overwrite=True``), which saves an image-sized array per pool. A view
    of an argument (a padded convolution's ``_shifted(x, ...)``) is never written into."""
    lenet = load_spec(ROOT / "examples" / "lenet.toml")
    module = load_module(generate_module(lenet))
    in_place = []  # per ReLU backward on images: whether it computed in the pool's gradient
    relu_backward = module.relu_mask_backward

    def recorded(dy, *args, **kwargs):
        dx = relu_backward(dy, *args, **kwargs)
        if dy.ndim == 4:
            in_place.append(np.shares_memory(dx, dy))
        return dx

    module.relu_mask_backward = recorded
    params, x, y = make_inputs(lenet, module, batch=2, seed=1)
    module.loss_and_grads(params, x, y)
    assert in_place == [True, True]  # the two ReLUs on images, each right before a pool

    net = Net([Conv2d(2, 3, padding=1, name="c"), symbp.relu(), Flatten(), symbp.linear(2)],
              input_shape=(1, 4, 4), loss="mse")
    module = load_module(generate_module(net))
    params, x, y = make_inputs(net, module, batch=3, seed=4)
    kept = x.copy()
    _, cache = module.forward(params, x)
    dout = np.ones((3, 2))
    first = module.backward(params, cache, dout)["x"]
    np.testing.assert_array_equal(module.backward(params, cache, dout)["x"], first)
    np.testing.assert_array_equal(x, kept)


def test_an_empty_batch_goes_through_forward_backward_and_predict():
    """No samples: outputs with no rows, parameter gradients that are empty sums (zeros), an
    input gradient with no rows; nothing divides by the batch's size or infers a width from
    it (the flatten spells its width out)."""
    net = load_spec(CONV_EXAMPLES[0])  # lenet.toml: no batch norm, whose statistics need samples
    module = load_module(generate_module(net))
    params = module.init_params()
    x = np.zeros((0, 1, 28, 28))
    out, cache = module.forward(params, x)
    assert out.shape == (0, 10)
    grads = module.backward(params, cache, np.ones_like(out))
    assert grads["x"].shape == x.shape
    for name, shape in module.PARAM_SHAPES.items():
        assert grads[name].shape == shape and not np.any(grads[name]), name
    assert module.predict(params, x).shape == (0, 10)
