"""The network plan (symbp.derivation.plan) and layers that carry their own behaviour.

Expected values come from the network's structure as declared (which layer reads which value),
from NumPy's C-order reshape, and from finite differences of the generated module.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symbp
from symbp.checking.gradcheck import check_spec, load_module
from symbp.declare.forms import Array, N
from symbp.declare.layers import REGISTRY, Elementwise, Layer, X
from symbp.derivation.plan import INPUT, Sum, Vjp, build_plan
from symbp.emit.module import generate_module

ROOT = Path(__file__).resolve().parent.parent


def residual_net():
    return symbp.Net(
        [
            symbp.linear(4, name="fc1"),
            symbp.relu(name="act"),
            symbp.residual([symbp.linear(4, name="inner"), symbp.tanh(name="t")], name="res"),
            symbp.linear(2, name="out"),
        ],
        input_features=3,
        loss="mse",
    )


def test_plan_values_are_named_nodes_and_a_value_read_twice_gets_a_sum():
    plan = build_plan(residual_net())
    # forward: a block's body before the block, which reads the block's input and the body's
    assert [(s.name, s.inputs) for s in plan.forward] == [
        ("fc1", (INPUT,)),
        ("act", ("fc1",)),
        ("inner", ("act",)),
        ("t", ("inner",)),
        ("res", ("act", "t")),
        ("out", ("res",)),
    ]
    assert plan.readers["act"] == ["inner", "res"]
    assert [s.depth for s in plan.forward] == [0, 0, 1, 1, 0, 0]
    # backward: reverse order; the gradient of "act" is the sum of what its two readers hand back
    names = [e.name for e in plan.backward]
    assert names == ["out", "res", "t", "inner", "sum act", "act", "fc1"]
    total = plan.backward[4]
    assert isinstance(total, Sum)
    assert total.target == "dact" and set(total.parts) == {"dact@res", "dact@inner"}
    res = plan.backward[1]
    assert isinstance(res, Vjp) and res.produces == ("dact@res", "dt")
    # only the first layer's input gradient is optional (nothing below it has parameters)
    assert [s.input_grad_optional for s in plan.forward] == [True] + [False] * 5
    assert [e.name for e in plan.backward_of("res")] == ["res", "t", "inner", "sum act"]


def test_plan_backward_runs_the_generated_backward_to_the_same_gradients():
    """Running the plan's steps with the module's own layer functions (symbp flow) gives the
    module's backward: the two read one plan."""
    from symbp.flow.numeric import backward_trace

    net = residual_net()
    module = load_module(generate_module(net))
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape) for k, v in module.init_params().items()}
    out, cache = module.forward(params, rng.standard_normal((5, 3)))
    dout = rng.standard_normal(out.shape)
    grads = module.backward(params, cache, dout)
    trace = backward_trace(net, module, params, cache, dout)
    for key, value in trace.grads.items():
        np.testing.assert_array_equal(value, grads[key])
    np.testing.assert_array_equal(trace.grad_in["fc1"], grads["x"])


def test_flatten_backward_is_derived_and_is_numpys_c_order_reshape():
    net = symbp.Net([symbp.flatten(), symbp.linear(2)], input_shape=(2, 3, 2), loss="mse")
    step = build_plan(net).forward[0]
    assert step.reshape
    adjoint = step.derivation.vjp["x"]
    dims = {"N": 2, "C": 2, "H_in": 3, "W_in": 2}
    sizes = {s: dims[s.name] for s in adjoint.expr.free_symbols if s.name in dims}
    dy = np.random.default_rng(1).standard_normal((2, 12))
    n, c, h, w = adjoint.indices
    derived = np.empty((2, 2, 3, 2))
    for at in np.ndindex(derived.shape):
        element = adjoint.expr.xreplace(sizes).xreplace(dict(zip((n, c, h, w), at, strict=True)))
        assert isinstance(element, sp.Indexed)
        derived[at] = dy[tuple(int(i) for i in element.indices)]
    np.testing.assert_array_equal(derived, dy.reshape(2, 2, 3, 2))


def test_no_module_outside_declare_tests_a_layers_class_or_kind():
    """What differs between layer types is declared on the layer; the rest reads it: no
    ``isinstance`` against a layer class imported from symbp.declare, no comparison of a
    ``kind`` with a string."""
    layer_classes = {cls.__name__ for cls in REGISTRY.values()} | {"Layer", "Elementwise", "Loss"}
    found = []
    for path in (ROOT / "symbp").rglob("*.py"):
        if (ROOT / "symbp" / "declare") in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        from_declare = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and "declare" in (node.module or "")
            for alias in node.names
        } & layer_classes
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
                    and len(node.args) == 2):
                names = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(node.args[1])}
                if names & from_declare:
                    found.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                texts = [ast.unparse(p) for p in parts]
                if any(
                    t == "kind" or (t.endswith(".kind") and not t.endswith("dtype.kind"))
                    for t in texts
                ) and any(
                    isinstance(p, ast.Constant) and isinstance(p.value, str) for p in parts
                ):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


class _Jitter(Elementwise):
    """A layer declared only here: ``x * r`` with ``r`` drawn from [0.5, 1.5] in training and
    its mean 1 in evaluation."""

    kind = "test_jitter"
    he_gain_before = True
    SCALE = sp.Symbol("r", positive=True)

    def expression(self):
        return X * self.SCALE

    def aux_form(self):
        r = Array("r", (N, symbp.declare.layers.F), positive=True)
        return (r,), {self.SCALE: r}

    def draws(self):
        return {"r": ("uniform", (0.5, 1.5))}

    def eval_form(self, in_shape):
        form = super().forward_form(in_shape)
        stage = form.output
        r = Array("r", (N, symbp.declare.layers.F), True)
        expr = stage.expr.xreplace({r[stage.indices]: 1})
        return type(form)(inputs=form.inputs, params=(), stages=(type(stage)(
            stage.array, stage.indices, expr),), letters=form.letters, elementwise=True)


@pytest.fixture
def jitter():
    REGISTRY[_Jitter.kind] = _Jitter
    yield _Jitter
    del REGISTRY[_Jitter.kind]


def test_a_layer_declared_in_one_place_is_drawn_trained_and_checked(jitter):
    """Nothing but the class above: the module draws r in training, uses the evaluation form in
    predict, gives the weights before it He's gain, and its gradients pass finite differences."""
    net = symbp.Net([symbp.linear(64, name="fc"), jitter(name="j"), symbp.linear(2)],
                    input_features=8, loss="mse")
    source = generate_module(net)
    module = load_module(source)
    params = module.init_params(seed=0)
    x = np.random.default_rng(3).standard_normal((4, 8))
    draws = []

    class Recording:  # a generator that says what it was asked for
        def __init__(self):
            self.generator = np.random.default_rng(5)

        def __getattr__(self, name):
            method = getattr(self.generator, name)
            return lambda *args, **kwargs: draws.append((name, args, kwargs)) or method(
                *args, **kwargs)

    out, _ = module.forward(params, x, rng=Recording())
    assert len(draws) == 1  # one draw of r in training, uniform on [0.5, 1.5], h's shape
    name, args, kwargs = draws[0]
    bound = inspect.signature(getattr(np.random.Generator, name)).bind(None, *args, **kwargs)
    bound.apply_defaults()
    assert name == "uniform" and (bound.arguments["low"], bound.arguments["high"]) == (0.5, 1.5)
    assert tuple(np.atleast_1d(bound.arguments["size"])) == (4, 64)
    r = np.random.default_rng(5).uniform(0.5, 1.5, (4, 64))
    hidden = (x @ params["fc.W"] + params["fc.b"]) * r
    np.testing.assert_allclose(out, hidden @ params["linear3.W"] + params["linear3.b"],
                               rtol=1e-12)
    assert np.std(params["fc.W"]) == pytest.approx(np.sqrt(2 / 8), rel=0.1)  # He: 2 / fan_in
    np.testing.assert_allclose(module.predict(params, x), module.forward(params, x, train=False)[0])
    direct = x @ params["fc.W"] + params["fc.b"]  # r = 1 in evaluation
    expected = direct @ params["linear3.W"] + params["linear3.b"]
    np.testing.assert_allclose(module.predict(params, x), expected, rtol=1e-12)
    assert check_spec(net, batch=3).passed


def test_declarations_have_defaults_for_every_layer():
    for cls in REGISTRY.values():
        assert isinstance(cls.he_gain_before, bool) and isinstance(cls.train_returns, tuple)
    assert Layer.min_values_per_statistic == 1 and Layer().draws() == {}
