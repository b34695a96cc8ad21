"""Saved-for-backward memory of the PyTorch target (issue 26, part 4): at most what autograd
saves for the same network written with torch.nn functions, for every example, and strictly
less for the activations whose derivative the engine rewrote (mish, SiLU, GELU, the user
expressions of examples/) than autograd of the same expression written with torch operations.

The bytes are caught with ``torch.autograd.graph.saved_tensors_hooks`` on both sides (each
storage once, the parameters' storages left out): deterministic counts, not timings. The
eager side is ``benchmarks/memory_kept.py``'s translation of each layer into its torch.nn
function (``F.conv2d``, ``F.batch_norm``, ``F.scaled_dot_product_attention`` ...), written
independently of the target's code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

torch = pytest.importorskip("torch")
F = torch.nn.functional

import symbp  # noqa: E402
from symbp.declare.activations import Activation, X  # noqa: E402
from symbp.declare.base import REGISTRY  # noqa: E402
from symbp.emit.torch_module import camel, generate_torch_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.toml"))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _memory_kept():
    if "memory_kept" not in sys.modules:
        sys.modules["memory_kept"] = _load(ROOT / "benchmarks" / "memory_kept.py", "memory_kept")
    return sys.modules["memory_kept"]


def _saved(function, params=()) -> int:
    """Bytes of the distinct storages autograd saves while ``function()`` runs forward, the
    parameters' aside."""
    own = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def _target(net, tmp_path):
    path = tmp_path / f"{net.name}_torch.py"
    path.write_text(generate_torch_module(net))
    module = _load(path, f"{net.name}_torch_memory")
    return getattr(module, camel(net.name))(seed=0, dtype=torch.float64)


def _layer_norm(item, reads, p):
    """custom_layernorm's custom layer (its stages are layer norm over the features) as the
    torch.nn function a PyTorch user calls."""
    eps = item.layer.constant_values()["eps"]
    return F.layer_norm(reads[0], tuple(p("gamma").shape), p("gamma"), p("beta"), eps=eps)


@pytest.mark.parametrize("example", EXAMPLES)
def test_target_saves_no_more_than_autograd_of_the_torch_nn_net(example, tmp_path):
    net = symbp.load_spec(ROOT / "examples" / f"{example}.toml")
    model = _target(net, tmp_path)
    tensors = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x = net.sample_input(np.random.default_rng(0), 16)
    x = torch.as_tensor(x if net.input_ids is not None else x.astype(np.float64))
    target = _saved(lambda: model(x), list(model.parameters()))
    eager = _saved(
        lambda: _memory_kept().torch_forward(net, tensors, x, custom=_layer_norm),
        list(tensors.values()),
    )
    assert 0 < target <= eager, (target, eager)


def test_padded_convolutions_attention_and_gelu_save_no_copy_autograd_does_not(tmp_path):
    """The arrays behind the examples that saved more than autograd: a padded convolution
    saves its input (not the zero-padded copy), attention not its T x T probabilities, GELU
    not erf(x/sqrt(2)); counted by hand from the shapes (float64, batch 16)."""

    def saved(net, x):
        model = _target(net, tmp_path)
        return _saved(lambda: model(x), list(model.parameters()))

    net = symbp.load_spec(ROOT / "examples" / "softmax_brier.toml")
    # fc1: x (16, 20); gelu: its input (16, 32); logits: gelu's output (16, 32); softmax:
    # its output (16, 5)
    x = torch.randn(16, 20, dtype=torch.float64)
    assert saved(net, x) == 8 * 16 * (20 + 32 + 32 + 5)
    net = symbp.Net([symbp.conv2d(4, 3, padding=1, name="conv")], input_shape=(2, 5, 5),
                    name="one_conv")
    x = torch.randn(16, 2, 5, 5, dtype=torch.float64)
    assert saved(net, x) == 8 * x.numel()  # x, not its (16, 2, 7, 7) padded copy
    net = symbp.Net([symbp.attention(heads=2, causal=True, name="mha")], input_shape=(6, 8),
                    name="one_attention")
    x = torch.randn(16, 6, 8, dtype=torch.float64)
    # x, and q, k, v and the context c, each (16, 2 heads, 6, 4): not p, (16, 2, 6, 6)
    assert saved(net, x) == 8 * (x.numel() + 4 * 16 * 2 * 6 * 4)


def _activations():
    """(label, layer, the torch forms people write for it, the native op or None)."""
    rows = [
        ("mish", Activation("x*tanh(log(1 + exp(x)))"),
         [lambda x: x * torch.tanh(F.softplus(x))], F.mish),
        ("silu", REGISTRY["silu"](), [lambda x: x * torch.sigmoid(x)], F.silu),
        ("gelu", REGISTRY["gelu"](), [lambda x: x * (1 + torch.erf(x / 2**0.5)) / 2], F.gelu),
    ]
    for path in sorted((ROOT / "examples").glob("*.toml")):
        for item in symbp.load_spec(path).walk():
            if item.layer.kind == "activation":
                rows.append((f"{path.stem}.{item.name}", item.layer, [], None))
    return rows


@pytest.mark.parametrize("label, layer, forms, native", _activations(),
                         ids=[row[0] for row in _activations()])
def test_activation_saves_less_than_autograd_of_its_expression(label, layer, forms, native,
                                                               tmp_path):
    net = symbp.Net([layer], input_features=32, name=f"{layer.kind}_alone")
    model = _target(net, tmp_path)
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    target = _saved(lambda: model(x))
    # the derived backward reads the input alone: one array of x's size
    assert target == x.numel() * x.element_size()
    # the layer's own expression in torch operations (numbers such as sqrt(2) as floats)
    expr = layer.expression().replace(lambda e: e.is_number and not e.is_Atom,
                                      lambda e: sp.Float(e.evalf()))
    written = sp.lambdify(X, expr, "torch")
    torch.testing.assert_close(model(x), written(x), rtol=1e-12, atol=1e-12)
    assert target < _saved(lambda: written(x))
    for form in forms:
        assert target < _saved(lambda form=form: form(x))
    if native is not None:  # as little as PyTorch's own fused kernel
        assert target <= _saved(lambda: native(x))
