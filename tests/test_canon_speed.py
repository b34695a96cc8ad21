"""How the canon layers' generated code computes (issue 24, part 4: speed), and that it still
computes PyTorch's values.

The forms asserted here are the ones ``benchmarks/canon_vs_torch.py`` measured faster
(docs/speed.md, *The canon layers*): no array of a whole product where a matrix-vector product
or an einsum reads the factors, results computed in dead temporaries. The
values are checked against PyTorch's layers (float64 to 1e-10, float32 to 1e-5 relative), in
the dtype the caller hands in.
"""

from __future__ import annotations

import numpy as np
import pytest

import symbp
from symbp.checking.gradcheck import load_module
from symbp.emit.module import generate_module

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _module(layer, **shape):
    return generate_module(symbp.Net([layer], **shape))


def _function(source: str, name: str) -> str:
    """The function's source without whitespace (lines are broken where they run long)."""
    start = source.index(f"def {name}(")
    return "".join(source[start:source.index("\ndef ", start + 1)].split())


def test_layer_norm_backward_reads_its_sums_by_blas():
    source = _module(symbp.layer_norm(name="ln"), input_features=6)
    backward = _function(source, "layer_norm_backward")
    # sum_k dy*gamma*xhat as (dy*xhat) @ gamma, sharing dgamma's product; no (N, F) array of
    # the three factors, no negated copy of dy before dy @ gamma
    assert "dy_xhat@gamma" in backward
    assert ".sum(axis=1)" not in backward and "-dy@" not in backward


def test_softmax_forward_computes_its_output_in_the_exponentials():
    source = _module(symbp.softmax(name="sm"), input_features=6)
    forward = _function(source, "softmax_forward")
    assert "out=exp_x" in forward  # y in exp_x's memory: one (N, F) array fewer


def test_group_norm_sums_its_groups_without_product_arrays():
    source = _module(symbp.group_norm(2, name="gn"), input_shape=(4, 3, 3))
    forward, backward = (_function(source, f"group_norm_{p}") for p in ("forward", "backward"))
    assert 'np.einsum("ijk,ijk->ij",x_minus_mu.reshape(N,groups,-1)' in forward
    assert "x_minus_mu**2" not in forward
    assert '"ijk,ijk->ij"' in backward and "*xhat).reshape(" not in backward


def _torch_layer(kind, shape, dtype, params):
    t = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    if kind == "layer_norm":
        layer = torch.nn.LayerNorm(shape[1:], dtype=t)
    elif kind == "group_norm":
        layer = torch.nn.GroupNorm(2, shape[1], dtype=t)
    else:
        return lambda x: getattr(torch, kind)(x, dim=1), ()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(params["layer.gamma"]))
        layer.bias.copy_(torch.from_numpy(params["layer.beta"]))
    return layer, (layer.weight, layer.bias)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("kind", "shape"), [
    ("layer_norm", (7, 10)), ("softmax", (7, 10)), ("log_softmax", (7, 10)),
    ("group_norm", (3, 4, 5, 5)),
])
def test_generated_layers_agree_with_torch_in_the_callers_dtype(kind, shape, dtype):
    factory = getattr(symbp, kind)
    layer = factory(2, name="layer") if kind == "group_norm" else factory(name="layer")
    size = {"input_shape": shape[1:]} if len(shape) > 2 else {"input_features": shape[1]}
    module = load_module(_module(layer, **size), f"canon_speed_{kind}")
    rng = np.random.default_rng(7)
    x = rng.normal(0.5, 2.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    params = {}
    if kind in ("layer_norm", "group_norm"):
        width = shape[1:] if kind == "layer_norm" else shape[1:2]
        params = {"layer.gamma": rng.normal(1.0, 0.3, width).astype(dtype),
                  "layer.beta": rng.normal(0.0, 0.3, width).astype(dtype)}
    y, cache = module.forward(params, x)
    grads = module.backward(params, cache, dy)
    tlayer, tparams = _torch_layer(kind, shape, dtype, params)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = tlayer(tx)
    expected = [ty, *torch.autograd.grad(ty, (tx, *tparams), torch.from_numpy(dy))]
    got = [y, grads["x"], *(grads[k] for k in ("layer.gamma", "layer.beta") if k in grads)]
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    for g, e in zip(got, expected, strict=True):
        e = e.detach().numpy()
        assert g.dtype == dtype and g.shape == e.shape
        assert np.max(np.abs(g - e)) <= tolerance * max(1.0, float(np.max(np.abs(e))))
