"""What backward keeps (issue 23, item 7): each array once, in its cheapest sufficient form, and
no more than PyTorch's autograd saves for the same net.

The expected sizes are counted by hand from the layers' shapes (what each derived backward
reads: a convolution its zero-padded input, batch norm ``xhat`` and ``invstd``, a linear layer
its input, a ReLU the sign of its output, max pooling each window's arg-max), not read off the
code's model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.checking.gradcheck import load_module
from symbp.declare.conv import Conv2d, Flatten, MaxPool2d
from symbp.flow.memory import measured_bytes, memory_model, minimum_bytes, predicted_bytes

ROOT = Path(__file__).resolve().parent.parent
CNN_BN = ROOT / "examples" / "cnn_bn.toml"
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cache(net, batch, dtype, seed=0):
    module = load_module(symbp.codegen(net))
    rng = np.random.default_rng(seed)
    x = net.sample_input(rng, batch)  # ids stay integers
    x = x if net.input_ids is not None else x.astype(dtype)
    _, cache = module.forward(module.init_params(seed=seed, dtype=dtype), x, train=True, rng=rng)
    return cache


def _roots(cache) -> list[np.ndarray]:
    """The distinct arrays that hold the cache's memory (a view by the array it views)."""
    found = {}
    for entries in cache.values():
        for array in entries:
            while isinstance(array.base, np.ndarray):
                array = array.base
            found[id(array)] = array
    return list(found.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_conv_example_keeps_each_value_once_in_its_cheapest_form(dtype):
    """examples/cnn_bn.toml (3x32x32; conv 16 pad 1, bn, relu, conv 16 pad 1, relu, max-pool 2,
    conv 16 stride 2 pad 1, relu, avg-pool 2, flatten, linear 10), per sample:

    * floats: conv1's padded input 3*34*34, bn1's xhat 16*32*32 (and invstd, 16 per batch),
      conv2's padded input 16*34*34 (the ReLU before it reads its output from there), conv3's
      padded input 16*18*18, the linear layer's input 16*4*4;
    * one byte each: the sign of the ReLU before the max pool (16*32*32) and of the last ReLU
      (16*8*8, conv3's output), the pool's arg-max per window (16*16*16).

    Before, the ReLUs kept their outputs and the pool its input: 16*32*32 floats twice more."""
    batch, size = 5, np.dtype(dtype).itemsize
    floats = batch * (3 * 34 * 34 + 16 * 32 * 32 + 16 * 34 * 34 + 16 * 18 * 18 + 16 * 4 * 4) + 16
    small = batch * (16 * 32 * 32 + 16 * 8 * 8 + 16 * 16 * 16)
    net = symbp.load_spec(CNN_BN)
    cache = _cache(net, batch, dtype)
    assert measured_bytes(cache) == floats * size + small
    assert predicted_bytes(memory_model(net), batch, dtype) == floats * size + small
    # no array is kept twice: the ReLU's output is the interior of conv2's padded copy
    relu = next(name for name in cache if name.startswith("relu") and
                cache[name][0].dtype == dtype)
    assert np.shares_memory(cache[relu][0], cache["conv2"][0])
    assert sorted(a.dtype.name for a in _roots(cache) if a.itemsize == 1) == [
        "bool", "bool", "uint8"]
    # the minimum (the derived backward's reads, each once, masks and arg-max in bits):
    # floats without the padding, one bit per sign, two per arg-max of 4 positions
    minimum = (batch * (3 * 32 * 32 + 16 * 32 * 32 + 16 * 32 * 32 + 16 * 16 * 16 + 16 * 4 * 4)
               + 16) * size + batch * (16 * 32 * 32 + 2 * 16 * 16 * 16 + 16 * 8 * 8) // 8
    assert minimum_bytes(net, batch, dtype) == minimum <= measured_bytes(cache)


def test_a_relu_keeps_its_output_where_the_next_layer_keeps_it_and_its_sign_elsewhere():
    """Before a linear layer (which keeps its input, the same array) the ReLU keeps its output
    at no cost; before max pooling (which keeps arg-maxes) its sign, one byte an element; before
    a padded convolution a view of that convolution's padded copy. The gradients are exact."""
    net = symbp.Net(
        [Conv2d(2, 3, padding=1, name="c1"), symbp.relu(name="r1"), MaxPool2d(2),
         Conv2d(3, 3, padding=1, name="c2"), symbp.relu(name="r2"),
         Conv2d(2, 3, padding=1, name="c3"), Flatten(), symbp.linear(4, name="fc"),
         symbp.relu(name="r3"), symbp.linear(2, name="out")],
        input_shape=(1, 6, 6), loss="softmax_cross_entropy",
    )
    cache = _cache(net, 3, np.float64)
    assert cache["r1"][0].dtype == bool and cache["maxpool2d3"][0].dtype == np.uint8
    assert np.shares_memory(cache["r2"][0], cache["c3"][0])
    assert cache["r2"][0].shape == (3, 3, 3, 3)
    assert cache["r3"][0] is cache["out"][0]
    # c1.xp, r1's sign, the arg-max, c2.xp, c3.xp, fc.x (c3's output, flat), r3.y = out.x
    assert len(_roots(cache)) == 7
    assert symbp.check(net).passed


def test_an_array_kept_before_a_flatten_is_read_from_the_flat_copy():
    """A ReLU on a convolution's output (a transposed product, not contiguous) before a flatten
    and a linear layer: the flatten copies it, and the ReLU reads the linear layer's copy."""
    net = symbp.Net([Conv2d(2, 3, padding=1, name="c"), symbp.relu(name="r"), Flatten(),
                     symbp.linear(2, name="fc")], input_shape=(1, 5, 5), loss="mse")
    cache = _cache(net, 4, np.float64)
    assert np.shares_memory(cache["r"][0], cache["fc"][0])
    assert measured_bytes(cache) == 4 * (7 * 7 + 2 * 5 * 5) * 8
    assert symbp.check(net).passed


@pytest.mark.parametrize("spec", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_keeps_at_least_the_minimum_and_each_array_once(spec):
    net = symbp.load_spec(spec)
    for dtype in (np.float64, np.float32):
        cache = _cache(net, 6, dtype)
        kept = measured_bytes(cache)
        assert minimum_bytes(net, 6, dtype) <= kept == sum(a.nbytes for a in _roots(cache))
        assert predicted_bytes(memory_model(net), 6, dtype) == kept


# -- against PyTorch -----------------------------------------------------------------------------
def _nets():
    nets = [(spec.stem, symbp.load_spec(spec), 8) for spec in EXAMPLES]
    conv = _load("conv_vs_numpy")
    from symbp.declare.spec import parse_spec

    nets += [(f"conv_vs_numpy {name}", parse_spec(conv.spec_text(name)), 8)
             for name in ("lenet", "wide")]
    nets.append(("generated_vs_numpy mlp", _load("generated_vs_numpy").reference_net(), 8))
    return nets


#: Nets whose cache is above PyTorch's: GELU keeps erf(x/sqrt(2)) beside x for its backward
#: (computed once for both passes, a speed choice) where PyTorch's gelu saves x alone; in
#: softmax_brier, transformer_block and attention_block (new with the layer canon and with
#: attention) no other saving makes up for it; attention_block's attention also keeps its
#: probabilities p (T x T a head) and context c, where PyTorch's scaled_dot_product_attention
#: recomputes what its backward needs. Listed here so that the test notices a change.
ABOVE_PYTORCH = {"softmax_brier", "transformer_block", "attention_block"}
#: Nets starting with layers without parameters (two_branch: x @ tanh(x)), which keep x and
#: tanh(x) for the input's gradient (``wrt_input``, the default) where PyTorch's input needs
#: no gradient and it saves nothing: even the minimum is above PyTorch's.
FOR_THE_INPUT = {"two_branch"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_cache_keeps_at_most_what_pytorch_saves(dtype):
    """Every example and benchmark net: the generated cache holds no more bytes than the tensors
    PyTorch's autograd saves for the same net (saved_tensors_hooks, each storage once)."""
    pytest.importorskip("torch")
    kept = _load("memory_kept")
    for label, net, batch in _nets():
        row = kept.measure(net, batch, dtype)
        if any(item.layer.kind == "custom" for item in net.walk()):
            continue  # a layer the user declared by its stages: PyTorch has no such layer
        assert isinstance(row["pytorch"], int), (label, row["pytorch"])
        if label in FOR_THE_INPUT:  # known, and said so in docs/speed.md
            assert row["pytorch"] < row["minimum"] <= row["generated"], (label, row)
            continue
        if label in ABOVE_PYTORCH:  # known, and said so in docs/speed.md: see ABOVE_PYTORCH
            assert row["minimum"] <= row["generated"] and row["pytorch"] < row["generated"], (
                label, row)
            continue
        assert row["minimum"] <= row["generated"] <= row["pytorch"], (label, row)
