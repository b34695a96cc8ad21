"""The hand-written references of the benchmarks (benchmarks/reference_mlp.py and
benchmarks/reference_bn.py) against an independent truth: central finite differences of a
plainly written float64 forward pass, on tiny sizes.  No wall-clock asserts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mlp = _load("reference_mlp")
bn = _load("reference_bn")

TINY_WIDTHS = (7, 6, 5, 6, 4)
TINY_N = 9
FD_STEP = 1e-5
REL_TOL = 1e-6


@pytest.fixture
def quick_gc(monkeypatch):
    """The timing helpers run a full garbage collection before timing: in the test session's
    heap (sympy's caches) that takes about half a second each time, and it is no part of what
    these tests check."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


# --------------------------------------------------------------------------- helpers


def naive_mlp_loss(params, x, y, eps=1e-5):
    """The network written as plainly as possible (no buffers, no in-place)."""
    h = x
    i = 1
    while f"fc{i}.W" in params:
        z = h @ params[f"fc{i}.W"] + params[f"fc{i}.b"]
        mu = z.mean(axis=0)
        var = ((z - mu) ** 2).mean(axis=0)
        zn = (z - mu) / np.sqrt(var + eps)
        h = np.maximum(params[f"bn{i}.gamma"] * zn + params[f"bn{i}.beta"], 0.0)
        i += 1
    logits = h @ params["out.W"] + params["out.b"]
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def naive_pre_relu(params, x, eps=1e-5):
    """All BN outputs (ReLU inputs), to check the finite differences stay off the kink."""
    out, h, i = [], x, 1
    while f"fc{i}.W" in params:
        z = h @ params[f"fc{i}.W"] + params[f"fc{i}.b"]
        zn = (z - z.mean(0)) / np.sqrt(z.var(0) + eps)
        a = params[f"bn{i}.gamma"] * zn + params[f"bn{i}.beta"]
        out.append(a)
        h = np.maximum(a, 0.0)
        i += 1
    return out


def central_differences(f, params, step=FD_STEP):
    grads = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + step
            up = f(params)
            p[idx] = old - step
            down = f(params)
            p[idx] = old
            g[idx] = (up - down) / (2 * step)
        grads[name] = g
    return grads


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def tiny_problem(seed):
    """Tiny float64 problem with non-trivial gamma/beta/biases."""
    params = mlp.make_params(seed, np.float64, TINY_WIDTHS)
    rng = np.random.default_rng(seed + 7)
    for name, p in params.items():
        if name.endswith(".gamma"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        elif not name.endswith(".W"):
            p[...] = rng.uniform(-0.5, 0.5, p.shape)
    x, y = mlp.make_batch(seed, np.float64, TINY_N, TINY_WIDTHS)
    return params, x, y


@pytest.fixture(scope="module")
def kink_free_problem():
    """The first seed whose ReLU inputs all stay well away from 0, so that a central
    difference never straddles the kink."""
    for seed in range(100):
        params, x, y = tiny_problem(seed)
        margin = min(np.abs(a).min() for a in naive_pre_relu(params, x))
        if margin > 1e3 * FD_STEP:
            return params, x, y
    raise AssertionError("no kink-free seed found")


# --------------------------------------------------------------------------- MLP


def test_mlp_param_shapes_and_init():
    params = mlp.make_params(0, np.float32)
    assert list(params) == list(mlp.param_shapes())
    assert params["fc1.W"].shape == (784, 1024) and params["out.W"].shape == (1024, 10)
    assert all(p.dtype == np.float32 for p in params.values())
    assert np.all(params["bn2.gamma"] == 1) and np.all(params["fc3.b"] == 0)
    assert abs(params["fc2.W"].std() - np.sqrt(2 / 1024)) < 1e-3
    x, y = mlp.make_batch(0, np.float32)
    assert x.shape == (256, 784) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() < 10


def test_mlp_loss_matches_naive_forward(kink_free_problem):
    params, x, y = kink_free_problem
    loss, _ = mlp.handwritten_loss_and_grads(params, x, y)
    assert loss == pytest.approx(naive_mlp_loss(params, x, y), rel=1e-13)


def test_mlp_grads_match_central_differences(kink_free_problem):
    params, x, y = kink_free_problem
    _, grads = mlp.handwritten_loss_and_grads(params, x, y)
    fd = central_differences(lambda p: naive_mlp_loss(p, x, y), params)
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape
        if name.startswith("fc") and name.endswith(".b"):
            # A bias followed by batch norm has an exactly zero gradient.
            assert np.abs(grads[name]).max() < 1e-12, name
            assert np.abs(fd[name]).max() < 1e-8, name
        else:
            assert rel_err(grads[name], fd[name]) < REL_TOL, name


def test_mlp_workspace_reuse_gives_same_result(kink_free_problem):
    params, x, y = kink_free_problem
    loss0, grads0 = mlp.handwritten_loss_and_grads(params, x, y)
    ws = mlp.MLPWorkspace.for_inputs(params, x)
    for _ in range(2):
        loss1, grads1 = mlp.handwritten_loss_and_grads(params, x, y, ws)
    assert loss1 == loss0
    for name in params:
        np.testing.assert_array_equal(grads1[name], grads0[name])


def test_mlp_input_is_not_modified():
    params, x, y = tiny_problem(3)
    x0, p0 = x.copy(), {k: v.copy() for k, v in params.items()}
    mlp.handwritten_loss_and_grads(params, x, y)
    np.testing.assert_array_equal(x, x0)
    for k in params:
        np.testing.assert_array_equal(params[k], p0[k])


def test_mlp_float32_stays_float32_and_agrees_with_float64():
    widths = (20, 16, 12, 16, 5)
    p32 = mlp.make_params(1, np.float32, widths)
    x32, y = mlp.make_batch(1, np.float32, 32, widths)
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    loss32, g32 = mlp.handwritten_loss_and_grads(p32, x32, y)
    loss64, g64 = mlp.handwritten_loss_and_grads(p64, x32.astype(np.float64), y)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in p32:
        assert g32[name].dtype == np.float32, name
        if not (name.startswith("fc") and name.endswith(".b")):
            assert rel_err(g32[name].astype(np.float64), g64[name]) < 1e-4, name


def test_gemm_only_does_the_eleven_products_of_the_pass():
    params = mlp.make_params(0, np.float32, TINY_WIDTHS)
    x, _ = mlp.make_batch(0, np.float32, TINY_N, TINY_WIDTHS)
    ops = mlp.make_gemm_operands(params, x)
    products = mlp.gemm_products(params, x, ops)
    assert len(products) == mlp.N_GEMMS == 11
    n, (d0, h1, h2, h3, c) = TINY_N, TINY_WIDTHS
    shapes = [(a.shape, b.shape, out.shape) for a, b, out in products]
    assert shapes == [
        ((n, d0), (d0, h1), (n, h1)),  # forward
        ((n, h1), (h1, h2), (n, h2)),
        ((n, h2), (h2, h3), (n, h3)),
        ((n, h3), (h3, c), (n, c)),
        ((h3, n), (n, c), (h3, c)),  # dW out
        ((n, c), (c, h3), (n, h3)),  # dX out
        ((h2, n), (n, h3), (h2, h3)),  # dW fc3
        ((n, h3), (h3, h2), (n, h2)),  # dX fc3
        ((h1, n), (n, h2), (h1, h2)),  # dW fc2
        ((n, h2), (h2, h1), (n, h1)),  # dX fc2
        ((d0, n), (n, h1), (d0, h1)),  # dW fc1 (no dX for the input)
    ]
    for a, b, out in products:
        assert a.dtype == b.dtype == out.dtype == np.float32
    mlp.gemm_only(params, x, ops)
    a, b, out = products[4]
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-6)


def test_time_alternating_returns_a_median_per_callable(quick_gc):
    calls = []
    times = mlp.time_alternating(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1
    )
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_time_in_blocks_runs_each_callable_in_blocks_that_alternate(quick_gc):
    calls = []
    blocks = mlp.time_in_blocks(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, blocks=3, per_block=2
    )
    assert {name: len(times) for name, times in blocks.items()} == {"a": 3, "b": 3}
    # Each block: one untimed call, then two timed ones; the first callable changes each block.
    assert "".join(calls) == "aaa" "bbb" "bbb" "aaa" "aaa" "bbb"


def test_median_ratio_pairs_the_blocks():
    # Block by block the ratios are 2, 2 and 0.5: their median is 2, while the ratio of the
    # two medians (2 / 2) would be 1.
    assert mlp.median_ratio([2.0, 4.0, 1.0], [1.0, 2.0, 2.0]) == 2.0


def test_mlp_agrees_with_torch(kink_free_problem):
    pytest.importorskip("torch")
    params, x, y = kink_free_problem
    step = mlp.torch_loss_and_grads(params, x, y, threads=1)
    loss_t, grads_t = step()
    loss, grads = mlp.handwritten_loss_and_grads(params, x, y)
    assert loss == pytest.approx(loss_t, rel=1e-12)
    for name in params:
        np.testing.assert_allclose(grads[name], grads_t[name], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- BN


@pytest.mark.parametrize("shape", [(6, 4), (11, 3)])
def test_bn_backward_matches_central_differences(shape):
    inp = bn.make_bn_inputs(shape, seed=1)
    dx, dgamma, dbeta = bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd)

    def loss(p):  # <dy, bn(x)>: its gradients are exactly the backward's outputs
        return float(np.sum(inp.dy * bn.bn_forward(p["x"], p["gamma"], p["beta"])[0]))

    fd = central_differences(
        loss, {"x": inp.x.copy(), "gamma": inp.gamma.copy(), "beta": inp.beta.copy()}
    )
    assert rel_err(dx, fd["x"]) < REL_TOL
    assert rel_err(dgamma, fd["gamma"]) < REL_TOL
    assert rel_err(dbeta, fd["beta"]) < REL_TOL


def test_bn_backward_out_buffers():
    inp = bn.make_bn_inputs((16, 8), seed=2)
    ref = bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd)
    out = np.empty_like(inp.dy)
    dx, _, _ = bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd, out=out)
    assert dx is out
    np.testing.assert_allclose(dx, ref[0], rtol=1e-14, atol=1e-15)
    vec = bn.bn_vector(8)
    dx, dgamma, dbeta = bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd, vec=vec)
    np.testing.assert_array_equal(dx, ref[0])
    np.testing.assert_array_equal(dgamma, ref[1])
    np.testing.assert_array_equal(dbeta, ref[2])
    with pytest.raises(ValueError):
        bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd, out=inp.dy)


@pytest.mark.parametrize("mode", ["native", "autograd"])
def test_bn_agrees_with_torch(mode):
    pytest.importorskip("torch")
    inp = bn.make_bn_inputs((32, 8), seed=3)
    ref = bn.numpy_bn_backward(inp.dy, inp.xhat, inp.gamma, inp.invstd)
    got = bn.torch_bn_backward_factory(inp, threads=1, mode=mode)()
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), r, rtol=1e-10, atol=1e-12)


def test_aligned_empty_places_data_at_the_page_offset():
    for offset in (0, 2048):
        a = mlp.aligned_empty((5, 3), np.float32, offset)
        assert a.shape == (5, 3) and a.dtype == np.float32 and a.flags.c_contiguous
        assert a.ctypes.data % 4096 == offset


def test_bn_backward_benchmark_checks_then_times_in_blocks(quick_gc):
    bench = _load("bn_backward")
    result = bench.benchmark((64, 8), threads=1, repeats=6, warmup=1, include_torch=False)
    # The generated function was compared with the hand-written compact form before timing.
    assert result["agreement"] < 1e-12
    assert set(result["times_s"]) == {"generated", "handwritten"}


def test_time_blocks_warms_up_then_times_about_repeats_calls_in_blocks(quick_gc):
    calls = []
    times, blocks = mlp.time_blocks({"a": lambda: calls.append("a")}, repeats=10, warmup=2,
                                    per_block=5)
    # 2 warm-up calls, then 10 // 5 = 2 blocks raised to the minimum of 3, each 1 + 5 calls.
    assert len(calls) == 2 + 3 * 6 and len(blocks["a"]) == 3
    assert times["a"] == sorted(blocks["a"])[1]


def test_native_blas_reruns_without_the_forced_kernel_and_only_when_asked(monkeypatch):
    runs = []

    class Done:
        returncode = 7

    def run(cmd, env):
        runs.append((cmd, env))
        return Done()

    monkeypatch.setattr(mlp.subprocess, "run", run)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    assert mlp.rerun_with_native_blas("bench.py", ["--threads", "1"], False) is None
    # argparse takes an abbreviation too; neither form is passed on to the child
    for flag in ("--native-blas", "--native"):
        assert mlp.rerun_with_native_blas("bench.py", [flag, "--threads", "1"], True) == 7
        cmd, env = runs[-1]
        assert cmd[1:] == ["bench.py", "--threads", "1"]
    assert "OPENBLAS_CORETYPE" not in env and "OPENBLAS_L2_SIZE" not in env
    assert env["SOMETHING_ELSE"] == "kept"
    # Nothing forced: nothing to rerun.
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delenv("OPENBLAS_L2_SIZE")
    assert mlp.rerun_with_native_blas("bench.py", ["--native-blas"], True) is None
    assert len(runs) == 2


def test_keep_freed_memory_reruns_without_the_flag_or_its_abbreviation(monkeypatch):
    runs = []

    class Done:
        returncode = 0

    monkeypatch.setattr(mlp.subprocess, "run", lambda cmd, env: runs.append((cmd, env)) or Done())
    for flag in ("--keep-freed-memory", "--keep"):
        assert mlp.rerun_keeping_freed_memory("bench.py", [flag, "--threads", "2"]) == 0
        cmd, env = runs[-1]
        assert cmd[1:] == ["bench.py", "--threads", "2"]
        assert env.items() >= mlp.KEEP_FREED_MEMORY_ENV.items()


def test_blas_description_names_the_kernel_and_what_forces_it(monkeypatch):
    pytest.importorskip("threadpoolctl")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    text = mlp.blas_description()
    assert text.startswith("BLAS: ") and "kernel " in text
    assert "forced by OPENBLAS_CORETYPE=Haswell" in text
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    assert "forced" not in mlp.blas_description()


# --------------------------------------------------------------------------- old vs new


def test_race_alternates_new_and_old_and_pairs_the_rounds(monkeypatch):
    against = _load("against")
    calls = []
    clock = iter(range(1000))  # each reading one tick later: every call takes 1 tick
    monkeypatch.setattr(against.time, "perf_counter", lambda: next(clock))
    cpu = iter(range(0, 2000, 2))  # and 2 ticks of CPU time
    monkeypatch.setattr(against.time, "process_time", lambda: next(cpu))
    result = against.race(lambda: calls.append("n"), lambda: calls.append("o"), repeats=4,
                          warmup=1)
    # one warm-up round, then new first, old first, new first, old first
    assert "".join(calls) == "no" "no" "on" "no" "on"
    assert result["wall_ratio"] == result["cpu_ratio"] == 1.0
    assert result["new_wall_s"] == result["old_wall_s"] == 1 and result["new_cpu_s"] == 2


def test_largest_difference_is_relative_to_the_largest_gradient():
    against = _load("against")
    grads = {"a": np.array([4.0, -8.0]), "b": np.array([1.0])}
    moved = {"a": grads["a"], "b": np.array([1.08])}
    assert against.largest_difference((2.0, moved), (2.0, grads)) == pytest.approx(0.01)
    with pytest.raises(AssertionError, match="names"):
        against.largest_difference((2.0, {"a": grads["a"]}), (2.0, grads))


@pytest.mark.slow
def test_old_sources_are_generated_by_the_revisions_own_symbp(tmp_path):
    """The committed tree of HEAD, unpacked and run in a child, generates a module that
    computes what this checkout's generates (the same spec)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(
        ["git", "-C", str(BENCH_DIR), "rev-parse", "HEAD"], capture_output=True
    ).returncode:
        pytest.skip("not a git checkout")
    against = _load("against")
    text = ('input = { features = 3 }\nloss = "mse"\n[[layers]]\ntype = "linear"\nout = 2\n'
            '[[layers]]\ntype = "tanh"\n')
    old = against.old_modules("HEAD", {"tiny": text}, tmp_path)["tiny"]
    assert Path(old.__file__).parent == tmp_path
    rng = np.random.default_rng(0)
    params = old.init_params(seed=1)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    loss, grads = old.loss_and_grads(params, x, y)
    W, b = params["linear1.W"], params["linear1.b"]
    out = np.tanh(x @ W + b)
    assert np.isclose(loss, np.mean((out - y) ** 2), rtol=1e-12)  # mse: mean over all entries
    # d/dW of mean((tanh(xW + b) - y)^2) = x^T [2 (out - y) (1 - out^2) / size]
    dz = 2 * (out - y) * (1 - out**2) / out.size
    np.testing.assert_allclose(grads["linear1.W"], x.T @ dz, rtol=1e-10)
    np.testing.assert_allclose(grads["linear1.b"], dz.sum(axis=0), rtol=1e-10)
