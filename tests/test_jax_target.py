"""The JAX target (``symbp codegen --target jax``): one ``jax.custom_vjp`` per layer math whose
backward rule is the derived backward printed with jnp.

The oracle of the gradients is independent of the printed rules twice over: the generated
NumPy module's ``loss_and_grads`` (another printer, another library) and JAX's own finite
differences (``jax.test_util.check_grads``). vmap's results are compared with the unbatched
calls they must equal.
"""

import importlib.util
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

import symbp
import symbp.cli
from symbp.derivation.plan import build_plan
from symbp.errors import SpecError

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUPPORTED = sorted(path.stem for path in (ROOT / "examples").glob("*.toml"))
BATCH = 6


def _load(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def modules():
    cache = {}

    def get(example):
        if example not in cache:
            net = symbp.load_spec(ROOT / "examples" / f"{example}.toml")
            cache[example] = (
                net,
                _load(f"{example}_numpy", symbp.codegen(net)),
                _load(f"{example}_jax", symbp.codegen(net, target="jax")),
            )
        return cache[example]

    return get


def _data(net, numpy_module, seed=0):
    rs = np.random.default_rng(seed)
    if net.input_ids:
        x = rs.integers(0, net.input_ids, (BATCH, *numpy_module.INPUT_SHAPE))
    else:
        x = rs.normal(size=(BATCH, *numpy_module.INPUT_SHAPE))
    if net.loss.target_kind == "labels":
        y = rs.integers(0, numpy_module.OUTPUT_SHAPE[0], BATCH)
    else:
        y = rs.uniform(size=(BATCH, *numpy_module.OUTPUT_SHAPE))
    return x, y


class _Replayed:
    """``jax`` for the generated module, its random draws replayed from the NumPy module's
    (the masks and slopes the NumPy forward kept), in order: the same network function."""

    def __init__(self, draws):
        self._draws = list(draws)
        self.random = types.SimpleNamespace(
            split=lambda key: (key, key),
            bernoulli=lambda key, p, shape: self._next(shape),
            uniform=lambda key, shape, dtype, lo, hi: self._next(shape),
        )

    def _next(self, shape):
        value = jnp.asarray(self._draws.pop(0))
        assert value.shape == shape
        return value

    def __getattr__(self, name):
        return getattr(jax, name)


def _numpy_draws(net, numpy_module, params, x, rng_seed):
    """The random arrays the NumPy forward draws (in order), read back from its generator."""
    draws = []
    rng = np.random.default_rng(rng_seed)
    _, cache = numpy_module.forward(params, x, train=True, state=None, rng=rng)
    for step in build_plan(net).forward:
        if step.draws:  # the draw is an input of the step's function, kept for its backward
            kept = dict(zip(step.kept, cache[step.name], strict=True))
            draws += [kept[name] for name in step.draws]
    return draws


@pytest.mark.parametrize("example", SUPPORTED)
def test_agrees_with_the_numpy_module(modules, example, monkeypatch):
    """loss, every gradient and the running statistics: the NumPy module's to 1e-10."""
    net, npm, jm = modules(example)
    x, y = _data(net, npm)
    params_np, state_np = npm.init_params(3), npm.init_state()
    params, state = jm.init_numpy(3)
    for key, value in params_np.items():  # init_numpy: the NumPy module's values, exactly
        np.testing.assert_array_equal(np.asarray(params[key]), value)
    draws = _numpy_draws(net, npm, params_np, x, 1)
    loss_np, grads_np = npm.loss_and_grads(params_np, x, y, state=state_np,
                                           rng=np.random.default_rng(1))
    monkeypatch.setattr(jm, "jax", _Replayed(draws))
    step = jax.jit(jax.value_and_grad(jm.loss, has_aux=True), static_argnames="train")
    (loss, new_state), grads = step(params, state, x, y, rng=jax.random.key(0))
    assert abs(float(loss) - loss_np) <= 1e-10 * max(1.0, abs(loss_np))
    assert set(grads) == set(params)
    for key, value in grads.items():
        scale = max(1.0, float(np.max(np.abs(grads_np[key]))))
        np.testing.assert_allclose(np.asarray(value), grads_np[key], rtol=0, atol=1e-10 * scale)
    assert set(new_state) == set(state_np)
    for key, value in new_state.items():
        np.testing.assert_allclose(np.asarray(value), state_np[key], rtol=0, atol=1e-10)


CONV = {"cnn_bn", "lenet", "allconv", "conv_autoencoder", "attention_block"}


# the convolutional nets' (and attention's) finite differences take 8-18 s each: CI's slow run
@pytest.mark.parametrize("example", [
    pytest.param(e, marks=pytest.mark.slow) if e in CONV else e for e in SUPPORTED
])
def test_check_grads(modules, example):
    """JAX's own finite differences agree with the derived backward rules (reverse mode)."""
    net, npm, jm = modules(example)
    x, y = _data(net, npm, seed=1)
    params, state = jm.init_numpy(5)
    key = jax.random.key(2)

    def loss(params):
        return jm.loss(params, state, x, y, rng=key)[0]

    check_grads(loss, (params,), order=1, modes=["rev"], eps=1e-6)
    if not net.input_ids:  # the input's gradient too (ids have none)
        check_grads(lambda x: jm.loss(params, state, x, y, rng=key)[0], (jnp.asarray(x),),
                    order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("example", ["mlp_bn", "transformer_block", "rnn_classifier"])
def test_vmap_over_batches_and_parameter_sets(modules, example):
    """vmap over a leading axis of x (several batches) and over stacked parameter sets equals
    the calls one by one; jax.grad under vmap gives each set's gradients."""
    net, npm, jm = modules(example)
    xs = np.stack([_data(net, npm, seed)[0] for seed in range(3)])
    ys = np.stack([_data(net, npm, seed)[1] for seed in range(3)])
    params, state = jm.init_numpy(0)
    key = jax.random.key(0)
    apply = jax.jit(jm.apply, static_argnames="train")
    batched = jax.vmap(lambda x: apply(params, state, x, rng=key))(xs)
    for k in range(3):
        one = apply(params, state, xs[k], rng=key)
        np.testing.assert_allclose(batched[0][k], one[0], rtol=1e-12, atol=1e-12)
        for name in one[1]:
            np.testing.assert_allclose(batched[1][name][k], one[1][name], rtol=1e-12, atol=1e-14)
    sets = [jm.init_numpy(seed)[0] for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *sets)
    grad = jax.grad(lambda p: jm.loss(p, state, xs[0], ys[0], rng=key)[0])
    grads = jax.jit(jax.vmap(grad))(stacked)
    for k, p in enumerate(sets):
        for name, value in grad(p).items():
            np.testing.assert_allclose(grads[name][k], value, rtol=1e-10, atol=1e-12)


def test_evaluation_mode_uses_the_running_statistics(modules):
    net, npm, jm = modules("mlp_bn")
    x, _ = _data(net, npm)
    params, state = jm.init_numpy(0)
    state = {k: v + 0.5 for k, v in state.items()}
    out, new_state = jm.apply(params, state, x, train=False)
    expected = npm.predict({k: np.asarray(v) for k, v in params.items()}, x,
                           {k: np.asarray(v) for k, v in state.items()})
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert new_state is not state and all(new_state[k] is state[k] for k in state)


def test_init_draws_from_the_key(modules):
    _, _, jm = modules("mlp_bn")
    params, state = jm.init(jax.random.key(0))
    assert {k: v.shape for k, v in params.items()} == jm.PARAM_SHAPES
    assert float(jnp.std(params["fc1.W"])) == pytest.approx((2 / 784) ** 0.5, rel=0.05)
    assert set(state) == set(jm.STATE_SHAPES)
    again, _ = jm.init(jax.random.key(0))
    assert all(np.array_equal(params[k], again[k]) for k in params)


def test_the_custom_rules_are_the_derived_ones(modules):
    """The backward JAX runs is the printed one: a custom_vjp per layer math whose rule calls
    the derived ``<stem>_backward``."""
    _, _, jm = modules("mlp_bn")
    source = symbp.codegen(ROOT / "examples" / "mlp_bn.toml", target="jax")
    for stem in ("linear", "batchnorm", "relu", "mish", "residual_add", "softmax_cross_entropy"):
        assert f"def {stem}(keywords, backward_keywords" in source
        assert f"{stem}.defvjp(" in source and f"def _{stem}_backward_rule(" in source
    assert ", out=" not in source and "_along_rows" not in source  # nothing in place


def test_a_layer_not_printed_yet_is_a_one_line_error(monkeypatch, capsys):
    """An array operation the JAX printer lacks (here the product of convolution windows,
    taken away) is one line naming the layer, exit 2."""
    from symbp.emit import jax_printer

    monkeypatch.delitem(jax_printer._FUNCTIONS, "window_tensordot")
    spec = str(ROOT / "examples" / "lenet.toml")
    assert symbp.cli.main(["codegen", spec, "--target", "jax", "-o", "-"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "conv1" in lines[0] and "jax target cannot print" in lines[0]


def test_without_jax_the_target_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real(name, *a))
    with pytest.raises(SpecError, match=r"pip install 'symbp\[jax\]'"):
        symbp.codegen(ROOT / "examples" / "bce.toml", target="jax")
    assert symbp.cli.main(["codegen", str(ROOT / "examples" / "bce.toml"), "--target", "jax",
                           "-o", "-"]) == 2


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_modules_are_ruff_clean(tmp_path):
    paths = []
    for example in SUPPORTED:
        path = tmp_path / f"{example}.py"
        path.write_text(symbp.codegen(ROOT / "examples" / f"{example}.toml", target="jax"),
                        encoding="utf-8")
        paths.append(str(path))
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *paths],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_input_is_a_value_error(modules):
    net, npm, jm = modules("allconv")
    params, state = jm.init_numpy(0)
    x, _ = _data(net, npm)
    with pytest.raises(ValueError, match=r"x has shape \(6, 3, 16\); expected \(N, 3, 16, 16\)"):
        jm.apply(params, state, x[..., 0], rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rng=jax.random.key"):  # dropout draws a mask
        jm.apply(params, state, x)
    out, _ = jm.apply(params, state, x, train=False)  # evaluation draws nothing
    assert out.shape == (BATCH, *npm.OUTPUT_SHAPE)
    _, npm, jm = modules("embedding_bag")
    params, state = jm.init_numpy(0)
    with pytest.raises(ValueError, match="integer ids"):
        jm.apply(params, state, np.zeros((2, *npm.INPUT_SHAPE)))
    with pytest.raises(SpecError, match="target must be one of numpy, torch, jax"):
        symbp.codegen(ROOT / "examples" / "bce.toml", target="jaxx")


def test_residuals_are_what_the_derivation_keeps(modules):
    """Each forward rule keeps the plan's kept arrays (those the NumPy module caches) and the
    parameters its backward reads: batch norm keeps invstd and xhat, not its input."""
    net, npm, jm = modules("mlp_bn")
    x, _ = _data(net, npm)
    params_np = npm.init_params(0)
    _, cache = npm.forward(params_np, x, train=True)
    params, _ = jm.init_numpy(0)
    plan = build_plan(net)
    h = jnp.asarray(x)
    for step in plan.forward:
        if step.name == "res1":
            break
        stem = step.layer.stem_for(step.placed.in_shape) + step.stem_suffix
        rule = getattr(jm, f"_{stem}_forward_rule")
        keywords = tuple(step.constants().items())
        out, (kept, params_read) = rule(keywords, (), h, *(params[k] for k in step.params))
        assert len(kept) == len(step.kept) == len(cache[step.name])
        for mine, theirs in zip(kept, cache[step.name], strict=True):
            np.testing.assert_allclose(np.asarray(mine), theirs, rtol=1e-12, atol=1e-12)
        assert [p.shape for p in params_read] == [params[k].shape for k in step.params_read]
        h = out[0] if isinstance(out, tuple) else out
    assert plan.step("bn1").kept == ["invstd", "xhat"]


RNN_SEQUENCE = """
name = "rnn_sequence"
input = { shape = [6, 4] }
loss = "mse"
layers = [
  { type = "rnn", name = "rnn", hidden = 8, sequence = true },
  { type = "rnn", name = "top", hidden = 3 },
]
"""


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_rnn_scans_the_derived_cell_and_agrees_with_the_numpy_module(kind):
    """rnn's and lstm's custom_vjp runs the printed cell's parts in jax.lax.scan, forward and
    backward (BPTT): under jit its loss and every gradient (dx included) are the NumPy
    module's to 1e-10, with every state fed to a second layer (sequence = true); JAX's finite
    differences agree."""
    net = symbp.parse_spec(RNN_SEQUENCE.replace('type = "rnn"', f'type = "{kind}"'))
    source = symbp.codegen(net, target="jax")
    assert source.count("jax.lax.scan(") == 4  # two layers' forward and backward, no loop
    assert "for t in" not in source
    npm, jm = _load("rnn_numpy", symbp.codegen(net)), _load("rnn_jax", source)
    x, y = _data(net, npm, seed=4)
    loss_np, grads_np = npm.loss_and_grads(npm.init_params(2), x, y)
    params, state = jm.init_numpy(2)
    step = jax.jit(jax.value_and_grad(lambda p, x: jm.loss(p, state, x, y)[0], argnums=(0, 1)))
    loss, (grads, dx) = step(params, jnp.asarray(x))
    assert abs(float(loss) - loss_np) <= 1e-10
    np.testing.assert_allclose(np.asarray(dx), grads_np["x"], rtol=0, atol=1e-10)
    for key, value in grads.items():
        np.testing.assert_allclose(np.asarray(value), grads_np[key], rtol=0, atol=1e-10)
    check_grads(lambda p, x: jm.loss(p, state, x, y)[0], (params, jnp.asarray(x)), order=1,
                modes=["rev"], eps=1e-6)


NAMED_INPUTS = """
name = "named_inputs"
loss = "mse"

[inputs]
x = [4]
mask = { features = 4 }
tokens = { ids = 5 }

[[layers]]
type = "linear"
name = "fc"
out = 4

[[layers]]
type = "multiply"
name = "masked"
inputs = ["fc", "mask"]

[[layers]]
type = "embedding"
name = "emb"
dim = 4
inputs = ["tokens"]

[[layers]]
type = "add"
name = "join"
inputs = ["masked", "emb"]

[[layers]]
type = "linear"
name = "out"
out = 3
"""


def test_several_named_inputs_are_arguments_of_apply_and_loss():
    """apply(params, state, x, mask, tokens): loss and every gradient (each float input's
    included) the NumPy module's to 1e-10 under jit, JAX's finite differences agree; a wrong
    shape or batch, float ids: a ValueError naming the input."""
    net = symbp.parse_spec(NAMED_INPUTS)
    npm = _load("named_numpy", symbp.codegen(net))
    jm = _load("named_jax", symbp.codegen(net, target="jax"))
    assert jm.INPUT_SHAPES == {"x": (4,), "mask": (4,), "tokens": ()}
    inputs = net.sample_input(np.random.default_rng(0), BATCH)
    x, mask, tokens = inputs["x"], inputs["mask"], inputs["tokens"]
    y = np.random.default_rng(1).normal(size=(BATCH, 3))
    loss_np, grads_np = npm.loss_and_grads(npm.init_params(3), x, mask, tokens, y)
    params, state = jm.init_numpy(3)

    def objective(params, x, mask):
        return jm.loss(params, state, x, mask, tokens, y)[0]

    loss, (grads, dx, dmask) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(
        params, x, mask)
    assert abs(float(loss) - loss_np) <= 1e-10
    for key, value in [*grads.items(), ("x", dx), ("mask", dmask)]:
        np.testing.assert_allclose(np.asarray(value), grads_np[key], rtol=0, atol=1e-10)
    out, _ = jm.apply(params, state, x=x, mask=np.zeros_like(mask), tokens=tokens)
    expected = np.asarray(params["emb.W"])[tokens] @ params["out.W"] + params["out.b"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12)  # masked: the ids alone
    check_grads(objective, (params, jnp.asarray(x), jnp.asarray(mask)), order=1, modes=["rev"],
                eps=1e-6)
    with pytest.raises(ValueError, match=r"mask has shape \(5, 4\); expected \(6, 4\)"):
        jm.apply(params, state, x, mask[:5], tokens)
    with pytest.raises(ValueError, match="tokens must hold integer ids"):
        jm.apply(params, state, x, mask, tokens.astype(float))
