"""conv_transpose2d (issue 24, item 2), proved right against truths that are not symbp's own.

* generated modules agree with PyTorch's ``F.conv_transpose2d`` (CPU, float64) to 1e-10: the
  loss, the output and every gradient, over kernels, strides, paddings and output paddings;
* the adjoint: the forward equals conv2d's *derived* input gradient with ``dy := x``, and
  ``<y(x), u> = <x, conv2d(u)>``, both as exact polynomial identities at small sizes;
* the derived backward equals direct differentiation of the scalar forward (the verifier);
* declaration errors are one line naming the field; ``symbp check`` passes on the example.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symbp
from symbp.checking.gradcheck import check_spec, load_module
from symbp.cli import main as cli_main
from symbp.declare.conv_transpose import ConvTranspose2d
from symbp.declare.forms import Stage
from symbp.declare.net import Net
from symbp.declare.spec import load_spec
from symbp.derivation.adjoint import prove_adjoint
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import default_sizes, verify_layer
from symbp.emit.module import generate_module
from symbp.errors import SpecError

torch = pytest.importorskip("torch")
tF = torch.nn.functional

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "conv_autoencoder.toml"
TOLERANCE = 1e-10

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def torch_forward(net: Net, params: dict, h):
    """The network in PyTorch's own functions, layer by layer."""
    for item in net.placed:
        layer, kind = item.layer, item.layer.kind

        def p(name, item=item):
            return params.get(f"{item.name}.{name}")

        if kind == "conv_transpose2d":
            h = tF.conv_transpose2d(h, p("W"), p("b"), stride=layer.stride,
                                    padding=layer.padding, output_padding=layer.output_padding)
        elif kind == "conv2d":
            h = tF.conv2d(h, p("W"), p("b"), stride=layer.stride, padding=layer.padding)
        elif kind == "relu":
            h = tF.relu(h)
        elif kind == "sigmoid":
            h = torch.sigmoid(h)
        elif kind == "flatten":
            h = h.flatten(1)
        else:
            raise AssertionError(kind)
    return h


def assert_agrees_with_torch(net: Net, *, batch: int = 3, seed: int = 0) -> None:
    module = load_module(generate_module(net))
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) * (1.2 / math.sqrt(math.prod(s[1:])) if len(s) == 4
                                           else 0.3) for k, s in net.param_shapes.items()}
    x = rng.standard_normal((batch, *net.input_shape))
    y = rng.uniform(0, 1, (batch, *net.output_shape))
    loss, grads = module.loss_and_grads(params, x, y)

    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    out = torch_forward(net, tensors, tx)
    target = torch.tensor(y)
    expected = (tF.mse_loss(out, target) if net.loss.kind == "mse"
                else tF.binary_cross_entropy_with_logits(out, target))
    expected.backward()
    assert abs(loss - expected.item()) <= TOLERANCE * abs(expected.item())
    want = {k: t.grad.numpy() for k, t in tensors.items()} | {"x": tx.grad.numpy()}
    assert set(grads) == set(want)
    for key, g in want.items():
        assert grads[key].shape == g.shape, key
        # (all zero where every output pixel falls in a gap between strided kernels)
        error = np.max(np.abs(grads[key] - g)) / max(np.max(np.abs(g)), 1e-300)
        assert error < TOLERANCE, (key, error)
    predicted, want = module.predict(params, x), out.detach().numpy()
    assert np.max(np.abs(predicted - want)) <= TOLERANCE * np.max(np.abs(want))


CASES = [  # (in_shape, out_channels, kernel, stride, padding, output_padding)
    ((2, 3, 4), 3, 3, 2, 1, 1),
    ((3, 4, 4), 2, 4, 2, 1, 0),
    ((2, 3, 3), 2, 2, 1, 0, 0),
    ((2, 4, 3), 3, 3, 1, 1, 0),
    ((1, 3, 2), 2, 3, 3, 2, 2),
    ((2, 3, 4), 2, [2, 3], 2, 0, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}p{c[4]}op{c[5]}")
@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_agrees_with_torch(case, loss):
    shape, out, kernel, stride, padding, output_padding = case
    layer = symbp.conv_transpose2d(out, kernel, stride=stride, padding=padding,
                                   output_padding=output_padding, name="up")
    net = Net([layer], input_shape=shape, loss=loss)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert net.param_shapes == {"up.W": (shape[0], out, kh, kw), "up.b": (out,)}
    assert_agrees_with_torch(net)


@st.composite
def _layers(draw):
    stride = draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 4) | st.tuples(st.integers(1, 3), st.integers(1, 3)).map(list))
    return dict(out_channels=draw(st.integers(1, 3)), kernel=kernel, stride=stride,
                padding=draw(st.integers(0, 2)), output_padding=draw(st.integers(0, stride - 1)),
                bias=draw(st.booleans()))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_layers(), second=st.none() | _layers(), channels=st.integers(1, 3),
       height=st.integers(1, 4), width=st.integers(1, 4), activation=st.booleans())
def test_drawn_layers_agree_with_torch(first, second, channels, height, width, activation):
    """Drawn kernels (stride above the kernel too: gaps of bias alone), paddings and output
    paddings, one or two layers (a ReLU between), against F.conv_transpose2d."""
    items = [symbp.conv_transpose2d(**first)]
    if second is not None:
        items += [symbp.relu()] if activation else []
        items.append(symbp.conv_transpose2d(**second))
    try:
        net = Net(items, input_shape=(channels, height, width), loss="mse")
    except SpecError as error:  # a padding that crops everything away: refused, as PyTorch
        assert "padding" in str(error)
        return
    assert_agrees_with_torch(net, batch=2)


def test_in_a_network_without_bias_agrees_with_torch():
    net = Net([symbp.conv2d(3, 3, stride=2, padding=1), symbp.relu(),
               symbp.conv_transpose2d(4, 3, stride=2, padding=1, output_padding=1, bias=False),
               symbp.relu(), symbp.conv_transpose2d(1, 2, stride=1), symbp.sigmoid()],
              input_shape=(2, 6, 5), loss="mse")
    assert net.output_shape == (1, 7, 7)  # 6x5 -> 3x3 -> 6x6 -> 7x7
    assert_agrees_with_torch(net, seed=3)


def test_the_example_agrees_with_torch_and_passes_check():
    net = load_spec(EXAMPLE)
    assert net.output_shape == net.input_shape  # an autoencoder
    assert_agrees_with_torch(net, batch=2, seed=1)
    report = check_spec(net, batch=2, seed=0)
    assert report.passed


def test_backward_is_derived_and_proven():
    for layer in (symbp.conv_transpose2d(2, 3, stride=2, padding=1, output_padding=1),
                  symbp.conv_transpose2d(2, 2, bias=False)):
        derivation = derive_layer(layer.forward_form((2, 3, 3)))
        # a strided convolution of dy, read in windows: no scatter, no delta left
        assert not derivation.vjp["x"].expr.has(sp.KroneckerDelta)
        results = verify_layer(derivation, default_sizes(derivation.form))
        assert results and all(r.proven for r in results), results


# --------------------------------------------------------------------------- the adjoint

ADJOINT_SIZES = [  # C, O, H, W, K_h, K_w with stride, padding, output padding
    dict(C=1, O=2, H_in=3, W_in=4, K_h=2, K_w=3),
    dict(C=2, O=1, H_in=4, W_in=3, K_h=3, K_w=2),
    dict(C=2, O=2, H_in=3, W_in=3, K_h=3, K_w=3),
]


@pytest.mark.parametrize("structure", [(1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0), (2, 1, 1)],
                         ids=lambda s: f"s{s[0]}p{s[1]}op{s[2]}")
@pytest.mark.parametrize("sizes", ADJOINT_SIZES, ids=lambda s: f"C{s['C']}H{s['H_in']}")
def test_forward_is_the_adjoint_of_conv2d_input_gradient(structure, sizes):
    stride, padding, output_padding = structure
    layer = symbp.conv_transpose2d(3, 2, stride=stride, padding=padding,
                                   output_padding=output_padding)
    named = dict(sizes, N=1, stride=stride, padding=padding, output_padding=output_padding)
    verdicts = prove_adjoint(layer, (2, 3, 3), named)
    assert [v.proven for v in verdicts] == [True, True], verdicts
    # the sizes proved at are the ones asked for (the output size by PyTorch's rule)
    height = (sizes["H_in"] - 1) * stride - 2 * padding + sizes["K_h"] + output_padding
    assert verdicts[0].sizes["H_out"] == height and verdicts[0].sizes["C"] == sizes["C"]


class _Doubled(ConvTranspose2d):
    """Twice the transposed convolution: not the adjoint of conv2d's input gradient."""

    kind = "test_doubled_conv_transpose"

    def forward_form(self, in_shape):
        form = super().forward_form(in_shape)
        last = form.stages[-1]
        form.stages = (*form.stages[:-1], Stage(last.array, last.indices, 2 * last.expr))
        return form

    def adjoint_of(self, in_shape):
        claim = super().adjoint_of(in_shape)
        linear = _Doubled(self.out_channels, list(self.kernel), stride=self.stride,
                          padding=self.padding, bias=False)
        return type(claim)(linear, claim.partner, claim.partner_shape, claim.renames,
                           claim.statement)


def test_the_adjoint_proof_refutes_a_wrong_forward():
    verdicts = prove_adjoint(_Doubled(2, 2, stride=2, padding=1), (2, 3, 3),
                             dict(N=1, C=1, O=2, H_in=3, W_in=3, K_h=2, K_w=2, stride=2,
                                  padding=1))
    assert [v.proven for v in verdicts] == [False, False]
    assert prove_adjoint(symbp.conv2d(2, 3), (2, 5, 5)) is None  # claims nothing


def test_derive_verify_proves_the_adjoint(tmp_path, capsys):
    spec = tmp_path / "up.toml"
    spec.write_text('input = { shape = [2, 3, 3] }\nloss = "mse"\n[[layers]]\n'
                    'type = "conv_transpose2d"\nname = "up"\nout_channels = 2\nkernel = 3\n'
                    'stride = 2\npadding = 1\noutput_padding = 1\n')
    assert cli_main(["derive", str(spec), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify adjoint: forward = conv2d's input gradient with dy := x" in out
    assert "verify adjoint: <forward(x), u> = <x, conv2d(u)>" in out
    assert out.count("proven (scalar expansion)") == 2 and "FAILED" not in out
    # what the derived gradients are: conv2d's forward pass, reading dy in windows
    assert "a correlation of dy with W (dy read in windows" in out
    assert "a correlation of dy with x (dy read in windows" in out


# --------------------------------------------------------------------------- declarations


SPEC = """
input = { shape = [2, 4, 4] }
loss = "mse"
[[layers]]
type = "conv_transpose2d"
name = "up"
out_channels = 3
kernel = 3
"""


@pytest.mark.parametrize("extra, said", [
    ("stride = 2\noutput_padding = 2\n", "up.*output_padding.*smaller than the stride 2"),
    ("output_padding = 1\n", "up.*output_padding.*smaller than the stride 1"),
    ("padding = -1\n", "up.*padding.*non-negative integer"),
    ("padding = 3\n", "up.*padding.*half the output"),
    ("stride = 0\n", "up.*stride.*positive integer"),
    ("dilation = 2\n", "up.*dilation"),
    ("bias = 1\n", "up.*bias.*true or false"),
])
def test_declaration_errors(extra, said):
    with pytest.raises(SpecError, match=said):
        symbp.parse_spec(SPEC + extra)


def test_declaration_from_toml_and_its_shapes():
    net = symbp.parse_spec(SPEC + "stride = 2\npadding = 1\noutput_padding = 1\n")
    assert net.output_shape == (3, 8, 8)  # (4 - 1)*2 - 2 + 3 + 1
    assert net.param_shapes == {"up.W": (2, 3, 3, 3), "up.b": (3,)}
    with pytest.raises(SpecError, match="images"):
        Net([symbp.conv_transpose2d(2, 3)], input_features=4, loss="mse")
    with pytest.raises(SpecError, match="kernel"):
        symbp.conv_transpose2d(2, 0)


def test_image_losses_and_their_limits():
    net = symbp.parse_spec(SPEC.replace('"mse"', '"bce_with_logits"'))
    assert net.output_shape == (3, 6, 6)
    with pytest.raises(SpecError, match="softmax_cross_entropy needs a feature-vector output"):
        symbp.parse_spec(SPEC.replace('"mse"', '"softmax_cross_entropy"'))


def test_flow_measures_a_network_with_image_outputs(tmp_path, capsys):
    """The chain Jacobians' basis has the output's shape (it was flattened to features)."""
    spec = tmp_path / "tiny.toml"
    spec.write_text('input = { shape = [1, 2, 2] }\nloss = "mse"\n[[layers]]\n'
                    'type = "conv_transpose2d"\nout_channels = 2\nkernel = 2\nstride = 2\n')
    assert cli_main(["flow", str(spec)]) == 0
    assert "Jacobians from VJPs" in capsys.readouterr().out


@pytest.mark.slow  # the example's notes prove every layer (about 20 s CPU); CI runs it
def test_example_derives_generates_and_flows(tmp_path, capsys):
    assert cli_main(["codegen", str(EXAMPLE), "-o", str(tmp_path / "ae.py")]) == 0
    source = (tmp_path / "ae.py").read_text()
    for stem in ("conv_transpose2d_strided", "conv_transpose2d_strided_outpadded"):
        for part in ("forward", "backward"):
            function = source.split(f"def {stem}_{part}(")[1].split("\ndef ")[0]
            assert "for " not in function and "_tensordot(" in function  # whole-array code
            # the kernel gradient's windows are read in place, not copied from a strided view
            assert "sliding_window_view" not in function
    assert cli_main(["flow", str(EXAMPLE)]) == 0
    assert cli_main(["latex", str(EXAMPLE), "-o", str(tmp_path / "ae.md")]) == 0
    notes = (tmp_path / "ae.md").read_text()
    assert "adjoint of conv2d's input gradient" in notes
    assert "Both were proved by scalar expansion" in notes


def test_weight_decay_covers_the_kernel_by_default_not_the_bias():
    """The issue: weight decay covers the weights of linear and conv layers by default."""
    net = Net([symbp.conv_transpose2d(2, 2, stride=2), symbp.flatten(), symbp.linear(2)],
              input_shape=(1, 2, 2), loss="mse", weight_decay=0.1)
    assert net.decayed == ("conv_transpose2d1.W", "linear3.W")
