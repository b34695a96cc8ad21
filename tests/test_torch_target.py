"""The PyTorch target (issue 26, parts 1 and 5): one autograd.Function per layer math with the
derived backward, an nn.Module per network. Oracles: torch.autograd.gradcheck (finite
differences of the module itself), the generated NumPy module (an independent emission of the
same derivation, checked against finite differences elsewhere) with torch's own losses, and
autograd's saved tensors for the memory claim."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from symbp import codegen  # noqa: E402
from symbp.declare.spec import load_spec  # noqa: E402
from symbp.emit.module import generate_module  # noqa: E402
from symbp.emit.torch_module import camel, generate_torch_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = sorted(path.stem for path in (ROOT / "examples").glob("*.toml"))
#: examples with random draws in training (dropout, rrelu): NumPy's and torch's generators differ
DRAWS = {"custom_activation", "transformer_block", "allconv"}


def _load(source, name, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def build(example):
        if example not in cache:
            net = load_spec(ROOT / "examples" / f"{example}.toml")
            folder = tmp_path_factory.mktemp(example)
            cache[example] = (
                net,
                _load(generate_torch_module(net), f"{example}_torch", folder),
                _load(generate_module(net), f"{example}_numpy", folder),
            )
        return cache[example]

    return build


def _model(net, module, seed=3):
    return getattr(module, camel(net.name))(seed=seed, dtype=torch.float64)


def _torch_loss(net, out, y):
    """The loss the spec names, as torch computes it (the caller's, as in PyTorch)."""
    kind = net.loss.kind
    if kind == "softmax_cross_entropy":
        return F.cross_entropy(out, torch.as_tensor(y))
    if kind == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(out, torch.as_tensor(y))
    assert kind == "mse"
    return F.mse_loss(out, torch.as_tensor(y))


def _targets(net, numpy_module, rng, n):
    if net.loss.kind == "softmax_cross_entropy":
        return rng.integers(0, numpy_module.OUTPUT_SHAPE[0], n)
    if net.loss.kind == "bce_with_logits":
        return rng.integers(0, 2, (n, *numpy_module.OUTPUT_SHAPE)).astype(float)
    return rng.normal(size=(n, *numpy_module.OUTPUT_SHAPE))


@pytest.mark.parametrize("example", SUPPORTED)
def test_gradcheck(example, built):
    net, module, _ = built(example)
    model = _model(net, module)
    names = [k for k, _ in model.named_parameters()]
    x = _inputs(net, module, np.random.default_rng(0), 3)

    def run(*params):
        model.generator = torch.Generator().manual_seed(0)  # the same draws each call
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

    run_x = lambda x, *params: torch.func.functional_call(  # noqa: E731
        model, dict(zip(names, params, strict=True)), (x,))
    assert torch.autograd.gradcheck(run, tuple(model.parameters()), fast_mode=True)
    if not net.input_ids:
        x.requires_grad_(True)
        model.eval()  # the input's gradient, the running statistics fixed
        assert torch.autograd.gradcheck(run_x, (x, *model.parameters()), fast_mode=True)


def _inputs(net, module, rng, n):
    if net.input_ids:
        return torch.as_tensor(rng.integers(0, net.input_ids, (n, *module.INPUT_SHAPE)))
    return torch.as_tensor(rng.normal(size=(n, *module.INPUT_SHAPE)))


@pytest.mark.parametrize("example", SUPPORTED)
def test_agrees_with_the_numpy_module(example, built):
    net, module, numpy_module = built(example)
    rng = np.random.default_rng(1)
    x = _inputs(net, module, rng, 5).numpy()
    params = numpy_module.init_params(3)
    model = _model(net, module)
    state = {k: torch.as_tensor(v) for k, v in model.state_dict().items()}
    np_state = {k: state[k].numpy().copy() for k in numpy_module.STATE_SHAPES}
    if example in DRAWS:  # evaluation mode: the output (no draws)
        model.eval()
        out = model(torch.as_tensor(x))
        expected = numpy_module.predict(params, x, np_state or None)
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-10)
        return
    y = _targets(net, numpy_module, rng, len(x))
    loss, grads = numpy_module.loss_and_grads(
        params, x, y, **({"state": np_state} if np_state else {})
    )
    xt = torch.tensor(x, requires_grad=not net.input_ids)
    torch_loss = _torch_loss(net, model(xt), y)
    if net.decayed:  # the NumPy module's loss_and_grads returns the objective J = L + s
        torch_loss = torch_loss + model.regularizer()
    torch_loss.backward()
    assert abs(torch_loss.item() - loss) <= 1e-10
    found = dict(model.named_parameters())
    for key, grad in grads.items():
        got = xt.grad if key == "x" else found[key].grad
        np.testing.assert_allclose(got.numpy(), grad, rtol=0, atol=1e-10, err_msg=key)
    for key, value in np_state.items():  # the running statistics, moved by the batch
        np.testing.assert_allclose(model.state_dict()[key].numpy(), value, rtol=0, atol=1e-10)


@pytest.mark.parametrize("example", SUPPORTED)
def test_state_dict_is_the_numpy_modules(example, built):
    net, module, numpy_module = built(example)
    model = _model(net, module, seed=7)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {**numpy_module.PARAM_SHAPES, **numpy_module.STATE_SHAPES}
    params = numpy_module.init_params(7)
    for key, value in params.items():  # the same seed, the same initial values
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value)
    other = numpy_module.init_params(8)
    model.load_state_dict({**model.state_dict(), **{k: torch.as_tensor(v) for k, v in
                                                     other.items()}})
    for key, value in other.items():
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value)


def test_float32_follows_the_input(built):
    net, module, _ = built("mlp_bn")
    model = getattr(module, camel(net.name))(dtype=torch.float32)
    out = model(torch.randn(4, *module.INPUT_SHAPE))
    out.sum().backward()
    assert out.dtype == torch.float32 and model.fc1.W.grad.dtype == torch.float32


def _saved_bytes(function, x):
    total = []

    def pack(t):
        total.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function(x).sum().backward()
    return sum(total)


def test_expr_writes_a_memory_efficient_activation(tmp_path):
    out = tmp_path / "mish.py"
    result = subprocess.run(
        [sys.executable, "-m", "symbp", "codegen", "--expr", "x*tanh(log(1 + exp(x)))",
         "--target", "torch", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    module = _load(out.read_text(), "mish_torch", tmp_path)
    mish = module.Activation()
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mish, (x[:4],))
    expected = x * torch.tanh(F.softplus(x, threshold=1000))
    torch.testing.assert_close(mish(x), expected, rtol=0, atol=1e-14)
    # memory-efficient: the input alone is saved (the derived backward computes
    # tanh(softplus(x)) again from it, as PyTorch's F.mish does), one array of x's size;
    # autograd on the same torch operations saves x and tanh(softplus(x)) at least
    kept = _saved_bytes(mish, x)
    assert kept == x.numel() * x.element_size()
    assert kept < _saved_bytes(lambda t: t * torch.tanh(F.softplus(t)), x)


def test_a_layer_not_printed_yet_is_named(monkeypatch):
    from symbp.emit import torch_helpers
    from symbp.errors import SpecError

    monkeypatch.delitem(torch_helpers.HELPER_SOURCES, "_window_tensordot")
    with pytest.raises(SpecError, match="layer 'conv1': the torch target cannot print"):
        generate_torch_module(load_spec(ROOT / "examples" / "lenet.toml"))


def test_without_torch_one_line_says_what_to_install(monkeypatch):
    from symbp.errors import SpecError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(SpecError, match=r"symbp\[torch\]"):
        codegen(ROOT / "examples" / "mlp_bn.toml", target="torch")


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_torch_modules_are_ruff_clean(tmp_path):
    from symbp.emit.torch_module import generate_torch_activation

    paths = []
    for example in SUPPORTED:
        paths.append(tmp_path / f"{example}.py")
        net = load_spec(ROOT / "examples" / f"{example}.toml")
        paths[-1].write_text(generate_torch_module(net))
    paths.append(tmp_path / "mish.py")  # no parameters: no unused initial values (F841)
    paths[-1].write_text(generate_torch_activation("x*tanh(log(1 + exp(x)))"))
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
         *map(str, paths)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generation_is_deterministic():
    net = load_spec(ROOT / "examples" / "cnn_bn.toml")
    assert generate_torch_module(net) == generate_torch_module(net)


def test_weight_decay_term_is_lambda_over_two_times_the_squared_weights(built):
    """The derived term and its gradient, against autograd of the textbook expression
    (d2l: s = lambda/2 (||W1||^2 + ||W2||^2)) on the covered weights only."""
    net, module, _ = built("mlp_weight_decay")
    model = _model(net, module)
    s = model.regularizer()
    s.backward()
    lam = module.WEIGHT_DECAY
    covered = dict(model.named_parameters())
    copies = {k: covered[k].detach().clone().requires_grad_() for k in module.DECAYED}
    expected = lam / 2 * sum((w ** 2).sum() for w in copies.values())
    expected.backward()
    assert abs(s.item() - expected.item()) <= 1e-12 * expected.item()
    for key, copy in copies.items():
        np.testing.assert_allclose(covered[key].grad.numpy(), copy.grad.numpy(), rtol=1e-12)
    assert set(module.DECAYED) == {k for k in covered if k.endswith(".W")}


RNN_SEQUENCE = """
name = "rnn_sequence"
input = { shape = [6, 4] }
loss = "softmax_cross_entropy"
layers = [
  { type = "rnn", name = "rnn", hidden = 8, sequence = true },
  { type = "flatten", name = "flat" },
  { type = "linear", name = "out", out = 3 },
]
"""
RNN_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0", "b_ih": "bias_ih_l0",
             "b_hh": "bias_hh_l0"}


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("sequence", [False, True])
def test_rnn_is_nn_rnn_and_its_backward_is_the_derived_bptt(kind, sequence, tmp_path):
    """rnn and lstm (examples/rnn_classifier.toml, examples/lstm_classifier.toml, and every
    state flattened into the head): the generated autograd.Function's forward and BPTT
    backward agree with nn.RNN / nn.LSTM + nn.Linear (float64, random biases, loss and every
    gradient, dx included, to 1e-10), with the NumPy module, and with finite differences of
    itself (gradcheck); rnn saves the derivation's kept arrays over t and the weights its
    backward reads."""
    from symbp.declare.spec import parse_spec

    if sequence:
        net = parse_spec(RNN_SEQUENCE.replace('"rnn"', f'"{kind}"'))
    else:
        net = load_spec(ROOT / "examples" / f"{kind}_classifier.toml")
    module = _load(generate_torch_module(net), f"{net.name}_torch", tmp_path)
    numpy_module = _load(generate_module(net), f"{net.name}_numpy", tmp_path)
    n, t, d, h = 5, 6, 4, 8
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(n, t, d)), rng.integers(0, 3, n)
    model = _model(net, module, seed=1)
    layer = getattr(model, kind)
    with torch.no_grad():  # init leaves the biases 0: PyTorch's uniform init instead
        for name in ("b_ih", "b_hh"):
            getattr(layer, name).copy_(torch.as_tensor(rng.uniform(-0.5, 0.5, layer.b_ih.shape)))
    xt = torch.tensor(x, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.shape) or s,
                                                  lambda s: s):
        out = model(xt)
    if kind == "rnn":
        assert saved[:5] == [(t, n, d), (t, n, h), (t, n, h), (h, d), (h, h)]
    loss = F.cross_entropy(out, torch.as_tensor(y))
    loss.backward()
    rnn = (torch.nn.RNN if kind == "rnn" else torch.nn.LSTM)(d, h, batch_first=True).double()
    head = torch.nn.Linear(h * (t if sequence else 1), 3).double()
    with torch.no_grad():
        for name, torch_name in RNN_NAMES.items():
            getattr(rnn, torch_name).copy_(getattr(layer, name))
        head.weight.copy_(model.out.W.T)
        head.bias.copy_(model.out.b)
    x_ref = torch.tensor(x, requires_grad=True)
    states, last = rnn(x_ref)
    last = last[0] if kind == "lstm" else last  # (h_n, c_n)
    features = states.reshape(n, -1) if sequence else last[0]
    expected = F.cross_entropy(head(features), torch.as_tensor(y))
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-10
    torch.testing.assert_close(xt.grad, x_ref.grad, rtol=0, atol=1e-10)
    for name, torch_name in RNN_NAMES.items():
        torch.testing.assert_close(getattr(layer, name).grad,
                                   getattr(rnn, torch_name).grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.out.W.grad, head.weight.grad.T, rtol=0, atol=1e-10)
    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    np_loss, grads = numpy_module.loss_and_grads(params, x, y)
    assert abs(np_loss - loss.item()) <= 1e-10
    np.testing.assert_allclose(xt.grad.numpy(), grads["x"], rtol=0, atol=1e-10)
    for k, v in model.named_parameters():
        np.testing.assert_allclose(v.grad.numpy(), grads[k], rtol=0, atol=1e-10, err_msg=k)
    names = [k for k, _ in model.named_parameters()]
    run = lambda x, *params: torch.func.functional_call(  # noqa: E731
        model, dict(zip(names, params, strict=True)), (x,))
    assert torch.autograd.gradcheck(run, (xt[:2].detach().requires_grad_(),
                                          *model.parameters()))
