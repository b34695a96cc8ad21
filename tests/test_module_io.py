"""What the generated module's public functions accept and refuse (issue 27, items 6, 10-12).

* a wrong shape of ``x``, ``y`` or ``dout`` is one ``ValueError`` naming the shape given and the
  shape the spec declares (not NumPy's "mismatch in its core dimension", not an ``IndexError``,
  and not a silent broadcast of ``y``);
* float32 ``x`` with float64 parameters computes in float64 from the first layer on (NumPy's
  promotion): batch norm's batch statistics too, so the result is the float64 computation's
  to the bit (a float32 number converts to float64 exactly);
* an empty batch gives what PyTorch gives: a NaN loss (a mean over no samples) and zero
  gradients (sums over no samples), without a ``ZeroDivisionError`` or a NumPy warning;
* every module has ``set_threads`` and says how to set the BLAS threads.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.checking.gradcheck import load_module
from symbp.declare.net import Net
from symbp.emit.module import generate_module

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@functools.cache
def example(stem: str):
    net = symbp.load_spec(ROOT / "examples" / f"{stem}.toml")
    return net, load_module(generate_module(net), f"io_{stem}")


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("stem", "shape", "expected"),
    [
        ("mlp_bn", (8, 785), "(N, 784)"),  # once "matmul: Input operand 1 has a mismatch ..."
        ("mlp_bn", (784,), "(N, 784)"),  # one sample without its batch axis
        ("mlp_bn", (8, 28, 28), "(N, 784)"),
        ("lenet", (8, 784), "(N, 1, 28, 28)"),  # flat input to a conv net: once an IndexError
        ("lenet", (8, 3, 28, 28), "(N, 1, 28, 28)"),
        ("lenet", (8, 1, 32, 32), "(N, 1, 28, 28)"),
    ],
)
def test_a_wrong_input_shape_is_refused_naming_both_shapes(stem, shape, expected):
    net, module = example(stem)
    params, state = module.init_params(), module.init_state()
    x = np.zeros(shape)
    message = exactly(f"x has shape {shape}; expected {expected}")
    with pytest.raises(ValueError, match=message):
        module.forward(params, x, state=state)
    with pytest.raises(ValueError, match=message):
        module.predict(params, x, state)
    with pytest.raises(ValueError, match=message):
        module.loss_and_grads(params, x, np.zeros(len(x), dtype=int), state=state)
    # The declared shape passes, as an array or as nested lists.
    good = np.random.default_rng(0).standard_normal((3, *net.input_shape))
    assert np.array_equal(module.predict(params, good, state),
                          module.predict(params, good.tolist(), state))


@pytest.mark.parametrize(
    ("stem", "shape"),
    [
        ("residual_mlp", (8, 3)),
        ("residual_mlp", (7, 4)),
        ("residual_mlp", (1, 4)),  # broadcast silently against (8, 4) before: a wrong loss
        ("residual_mlp", (4,)),  # broadcast silently as well
        ("bce", (8,)),
        ("bce", (8, 3, 1)),
    ],
)
def test_targets_of_the_wrong_shape_are_refused(stem, shape):
    net, module = example(stem)
    expected = (8, *net.output_shape)
    x = np.zeros((8, *net.input_shape))
    with pytest.raises(ValueError, match=exactly(f"y has shape {shape}; expected {expected}")):
        module.loss_and_grads(module.init_params(), x, np.zeros(shape), state=module.init_state())


def test_labels_of_the_wrong_shape_are_refused_with_their_shape():
    _, module = example("mlp_bn")
    with pytest.raises(ValueError, match=r"8 integer class labels .* \(y has shape \(8, 10\)"):
        module.loss_and_grads(module.init_params(), np.zeros((8, 784)), np.zeros((8, 10), int))


@pytest.mark.parametrize(("stem", "shape"), [("mlp_bn", (8, 11)), ("lenet", (8,))])
def test_an_output_gradient_of_the_wrong_shape_is_refused(stem, shape):
    net, module = example(stem)
    params = module.init_params()
    _, cache = module.forward(params, np.ones((8, *net.input_shape)), state=module.init_state())
    with pytest.raises(ValueError, match=exactly(f"dout has shape {shape}; expected (N, 10)")):
        module.backward(params, cache, np.zeros(shape))


# --------------------------------------------------------------------------- dtypes


def _statistics_first(kind: str) -> Net:
    if kind == "features":
        return Net([symbp.batchnorm(name="bn", momentum=0.3), symbp.tanh(), symbp.linear(3)],
                   input_features=5, loss="mse")
    return Net([symbp.batchnorm(name="bn", momentum=0.3), symbp.relu(), symbp.flatten(),
                symbp.linear(3)], input_shape=(2, 3, 3), loss="mse")


@pytest.mark.parametrize("kind", ["features", "images"])
def test_float32_input_with_float64_parameters_computes_in_float64(kind):
    """Batch norm first: its batch statistics were float32 (the input's dtype) while the
    parameters and the README said float64."""
    net = _statistics_first(kind)
    module = load_module(generate_module(net), f"mixed_{kind}")
    rng = np.random.default_rng(5)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in module.init_params().items()}
    x32 = (1e3 + rng.standard_normal((6, *net.input_shape))).astype(np.float32)
    y = rng.standard_normal((6, 3))
    x64 = x32.astype(np.float64)  # exact: every float32 is a float64

    state32, state64 = module.init_state(), module.init_state()
    loss32, grads32 = module.loss_and_grads(params, x32, y, state=state32)
    loss64, grads64 = module.loss_and_grads(params, x64, y, state=state64)
    assert loss32.dtype == np.float64 and loss32 == loss64
    assert {k: g.dtype for k, g in grads32.items()} == dict.fromkeys(grads64, np.float64)
    assert all(np.array_equal(grads32[k], grads64[k]) for k in grads64)
    assert all(np.array_equal(state32[k], state64[k]) for k in state64)
    # The running statistics against their definition, in float64 with NumPy's own reductions
    # (PyTorch's BatchNorm: momentum * batch statistic + (1 - momentum) * running value, the
    # variance unbiased); in float32 the mean is off by about 1e3 * 6e-8.
    axes = (0,) if kind == "features" else (0, 2, 3)
    count = x64.size // x64.shape[1]
    mean = x64.mean(axis=axes)
    variance = x64.var(axis=axes) * count / (count - 1)
    np.testing.assert_allclose(state32["bn.running_mean"], 0.3 * mean, rtol=1e-14)
    np.testing.assert_allclose(state32["bn.running_var"], 0.3 * variance + 0.7, rtol=1e-12)
    out, _ = module.forward(params, x32, state=module.init_state())
    assert out.dtype == np.float64


def test_one_dtype_keeps_it_and_the_input_is_not_copied():
    net = _statistics_first("features")
    module = load_module(generate_module(net), "one_dtype")
    params = module.init_params(dtype=np.float32)
    x = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    before = x.copy()
    out, cache = module.forward(params, x, state=module.init_state(dtype=np.float32))
    assert out.dtype == np.float32 and np.array_equal(x, before)


# --------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("stem", ["deep_sigmoid", "custom_activation", "lenet"])
def test_an_empty_batch_gives_a_nan_loss_and_zero_gradients_as_pytorch(stem, dtype):
    """A mean over no samples is 0/0 (PyTorch: ``F.cross_entropy`` and ``F.mse_loss`` of an
    empty batch are nan), and a parameter's gradient is a sum over the samples: 0."""
    net, module = example(stem)
    params = module.init_params(dtype=dtype)
    x = np.zeros((0, *net.input_shape), dtype=dtype)
    loss, grads = module.loss_and_grads(params, x, np.zeros(0, dtype=int))  # no warning either
    assert np.isnan(loss) and loss.dtype == dtype
    assert grads["x"].shape == x.shape
    for key, shape in module.PARAM_SHAPES.items():
        assert grads[key].shape == shape and grads[key].dtype == dtype
        assert not grads[key].any()
    _, grads = module.loss_and_grads(params, x, np.zeros(0, dtype=int), wrt_input=False)
    assert "x" not in grads


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_an_empty_batch_with_targets_gives_a_nan_loss(loss):
    net = Net([symbp.linear(4), symbp.relu(), symbp.linear(3)], input_features=2, loss=loss)
    module = load_module(generate_module(net), f"empty_{loss}")
    value, grads = module.loss_and_grads(module.init_params(), np.zeros((0, 2)), np.zeros((0, 3)))
    assert np.isnan(value)
    assert all(not grads[k].any() and grads[k].shape == s for k, s in module.PARAM_SHAPES.items())


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_every_module_has_set_threads_and_names_the_blas_threads(spec):
    net, module = example(spec.stem)
    assert "OPENBLAS_NUM_THREADS=1" in module.__doc__
    assert "OPENBLAS_NUM_THREADS=1" in module.set_threads.__doc__
    for count in (0, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            module.set_threads(count)
    x = net.sample_input(np.random.default_rng(1), 4)
    params, state = module.init_params(), module.init_state()
    expected = module.predict(params, x, state)
    module.set_threads(2)
    try:
        assert np.array_equal(module.predict(params, x, state), expected)
    finally:
        module.set_threads(1)


def test_set_threads_says_what_it_sets():
    _, dense = example("mlp_bn")
    _, conv = example("lenet")
    assert "changes nothing" in dense.set_threads.__doc__
    assert "array helpers" in conv.set_threads.__doc__
    assert "no threads of its own" in dense.__doc__
