"""benchmarks/canon_vs_torch.py on tiny sizes: the generated step and PyTorch's compute the same
values (so the benchmark times the same work), and its block timer pairs the blocks. No
wall-clock asserts."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "canon_vs_torch.py"


@pytest.fixture(scope="module")
def bench():
    saved = dict(os.environ)  # the script sets the thread variables for its own process
    spec = importlib.util.spec_from_file_location("canon_vs_torch", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["canon_vs_torch"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("kind", "shape"), [
    ("layer_norm", (5, 6)), ("softmax", (5, 6)), ("log_softmax", (5, 6)),
    ("group_norm", (2, 8, 3, 3)),
])
def test_generated_and_torch_steps_agree(bench, kind, shape, dtype):
    from symbp.checking.gradcheck import load_module
    from symbp.declare.spec import parse_spec
    from symbp.emit.module import generate_module

    extra = f"groups = {bench.GROUPS}\n" if kind == "group_norm" else ""
    module = load_module(generate_module(parse_spec(bench._spec(kind, shape[1:], extra))),
                         f"tiny_{kind}")
    data = bench.inputs(kind, shape, np.dtype(dtype))
    ours, theirs = bench.generated_step(module, data)(), bench.torch_step(kind, data)()
    assert len(ours) == (4 if kind in ("layer_norm", "group_norm") else 2)
    assert bench.difference(ours, theirs) <= bench.tolerance(np.dtype(dtype))


def test_difference_is_relative_to_the_largest_expected_value(bench):
    expected = [np.array([1.0, -4.0]), np.array([2.0])]
    got = [np.array([1.0, -3.0]), np.array([2.0])]
    assert bench.difference(got, expected) == pytest.approx(0.25)
    with pytest.raises(AssertionError):
        bench.difference([np.zeros(3)], [np.zeros(2)])


def test_time_blocks_pairs_the_blocks_of_the_two_sides(bench):
    calls = {"a": 0, "b": 0}

    def side(name):
        def call():
            calls[name] += 1
        return call

    result = bench.time_blocks({"a": side("a"), "b": side("b")}, repeats=15, warmup=2,
                               per_block=5)
    # 2 warm-up calls, then 3 blocks of one untimed and 5 timed calls each
    assert calls == {"a": 2 + 3 * 6, "b": 2 + 3 * 6}
    assert {"a_cpu_s", "b_wall_s", "cpu_ratio", "wall_ratio"} <= set(result)
