"""Embedding forward + backward: the generated functions vs PyTorch's ``nn.Embedding``, 1 thread.

The generated side is ``embedding_forward(ids, W)`` then ``embedding_backward(dy, ids, V=V)``
from the module symbp generates for a network whose first layer is an embedding (the weight
gradient ``dW = _scatter_rows(dy, ids, V)`` is derived by symbp from ``y[n, j] = W[ids[n], j]``:
a stable sort of the ids, ``np.add.reduceat`` over the repeated ones). PyTorch's side is
``F.embedding(ids, W)`` then ``y.backward(dy)``: its default dense gradient, a ``(V, dim)``
array like the generated
one (``W.grad`` reset to None before each call, so neither side accumulates into an old
array). ``sparse=True`` (a sparse gradient of the rows read, no ``(V, dim)`` array) is timed
too, for context, not compared against.

Sizes: a vocabulary of 50,000, dim 256, a batch of 4,096 ids drawn uniformly (``--ids zipf``:
a Zipf-like draw, most ids repeated), float32 and float64. Before timing, the generated
outputs are compared with PyTorch's. The two sides are timed in alternating blocks of
``PER_BLOCK`` calls (CPU time, one thread: the BLAS and OpenMP variables below are set before
NumPy and PyTorch load, and ``torch.set_num_threads(1)``); the printed times are the medians
over the blocks, the ratio the median of the block-by-block ratios (a drift of the machine
then cancels). The goal (issue 24): generated <= 1.5x PyTorch.

    python benchmarks/embedding_vs_torch.py [--repeats 40] [--ids uniform|zipf] [--json]
    python benchmarks/embedding_vs_torch.py --methods   # the scatter-add four ways
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before NumPy (and PyTorch) load

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import symbp  # noqa: E402
from symbp.checking.gradcheck import load_module  # noqa: E402
from symbp.emit.module import generate_module  # noqa: E402

VOCABULARY, DIM, BATCH = 50_000, 256, 4096
GOAL = 1.5
PER_BLOCK = 5  # calls of one side in a row (after one untimed call)


def generated_functions(vocabulary: int, dim: int):
    """The generated ``embedding_forward`` and ``embedding_backward``."""
    net = symbp.Net([symbp.embedding(dim, name="emb")], input_ids=vocabulary, loss="mse")
    module = load_module(generate_module(net), "symbp_generated_embedding")
    return module.embedding_forward, module.embedding_backward


def draw_ids(rng, kind: str, vocabulary: int, batch: int) -> np.ndarray:
    if kind == "zipf":
        return np.minimum(rng.zipf(1.3, batch), vocabulary) - 1
    return rng.integers(0, vocabulary, size=batch)


def sides(dtype, ids_kind: str, vocabulary=VOCABULARY, dim=DIM, batch=BATCH, seed=0):
    """``{name: step}``: one forward + backward each, returning ``(y, dW)``."""
    import torch

    torch.set_num_threads(1)
    forward, backward = generated_functions(vocabulary, dim)
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocabulary, dim)).astype(dtype)
    ids = draw_ids(rng, ids_kind, vocabulary, batch)
    dy = rng.standard_normal((batch, dim)).astype(dtype)

    def generated():
        y, cache = forward(ids, table)
        return y, backward(dy, *cache, V=vocabulary)

    weight = torch.tensor(table, requires_grad=True)
    tids, tdy = torch.from_numpy(ids), torch.from_numpy(dy)

    def pytorch(sparse=False):
        weight.grad = None
        y = torch.nn.functional.embedding(tids, weight, sparse=sparse)
        y.backward(tdy)
        return y, weight.grad

    return {"generated": generated, "pytorch": pytorch,
            "pytorch sparse": lambda: pytorch(sparse=True)}


def check(steps, dtype) -> float:
    """The largest difference of the generated ``y`` and ``dW`` from PyTorch's, relative."""
    y, dW = steps["generated"]()
    ty, tdW = steps["pytorch"]()
    worst = 0.0
    for mine, theirs in ((y, ty.detach().numpy()), (dW, tdW.numpy())):
        scale = max(float(np.abs(theirs).max()), 1e-300)
        worst = max(worst, float(np.abs(mine - theirs).max()) / scale)
    if worst > (1e-12 if dtype == np.float64 else 1e-5):
        raise AssertionError(f"the generated embedding disagrees with PyTorch's: {worst:.3g}")
    return worst


def time_blocks(steps, repeats: int) -> dict[str, list[float]]:
    """CPU seconds per call, per block of PER_BLOCK calls, the sides alternating."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # untimed: first-call costs
    for _ in range(max(1, repeats // PER_BLOCK)):
        for name, step in steps.items():
            start = time.process_time()
            for _ in range(PER_BLOCK):
                step()
            times[name].append((time.process_time() - start) / PER_BLOCK)
    return times


def benchmark(dtype, ids_kind="uniform", repeats=40) -> dict:
    steps = sides(dtype, ids_kind)
    agreement = check(steps, dtype)
    times = time_blocks(steps, repeats)
    ratios = [g / t for g, t in zip(times["generated"], times["pytorch"], strict=True)]
    return {
        "dtype": np.dtype(dtype).name,
        "ids": ids_kind,
        "agreement": agreement,
        **{f"{name} ms": 1e3 * statistics.median(values) for name, values in times.items()},
        "ratio": statistics.median(ratios),
    }


def scatter_methods(dtype, ids_kind="uniform", repeats=20) -> dict[str, float]:
    """CPU ms per call of whole-array ways of the weight gradient's scatter-add (each a new
    zero ``(V, dim)`` array, as the generated code returns): ``np.add.at``, one
    ``np.bincount`` per column, a stable sort and ``np.add.reduceat`` over every run of equal
    ids, and the runtime's ``_scatter_rows`` (the same sort; an id met once copies its row,
    reduceat only over the ids met several times)."""
    from symbp.runtime.gather import _scatter_rows

    rng = np.random.default_rng(1)
    ids = draw_ids(rng, ids_kind, VOCABULARY, BATCH)
    dy = rng.standard_normal((BATCH, DIM)).astype(dtype)

    def add_at():
        out = np.zeros((VOCABULARY, DIM), dtype)
        np.add.at(out, ids, dy)
        return out

    def bincount():
        out = np.empty((VOCABULARY, DIM), dtype)
        for column in range(DIM):
            out[:, column] = np.bincount(ids, dy[:, column], minlength=VOCABULARY)
        return out

    def reduceat():
        order = np.argsort(ids, kind="stable")
        ordered = ids[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        out = np.zeros((VOCABULARY, DIM), dtype)
        out[ordered[starts]] = np.add.reduceat(dy[order], starts, axis=0)
        return out

    methods = {"np.add.at": add_at, "bincount per column": bincount,
               "sort, reduceat every run": reduceat,
               "sort, copy lone ids, reduceat the rest (used)":
               lambda: _scatter_rows(dy, ids, VOCABULARY)}
    reference = add_at()
    for method in methods.values():
        np.testing.assert_allclose(method(), reference, rtol=1e-4, atol=1e-4)
    times = time_blocks(methods, repeats)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per side")
    parser.add_argument("--ids", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--methods", action="store_true",
                        help="time four ways of the scatter-add instead (why the one used)")
    args = parser.parse_args(argv)
    if args.methods:
        for dtype in (np.float32, np.float64):
            for name, ms in scatter_methods(dtype, args.ids).items():
                print(f"{np.dtype(dtype).name:<8} {name:<46} {ms:8.2f} ms")
        return 0
    rows = [benchmark(dtype, args.ids, args.repeats) for dtype in (np.float32, np.float64)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"embedding forward + backward, V={VOCABULARY}, dim={DIM}, {BATCH} {args.ids} ids, "
          "1 thread, CPU ms per call (medians over blocks)")
    print(f"{'dtype':<8} {'generated':>10} {'pytorch':>10} {'ratio':>6} {'torch sparse':>13}")
    for row in rows:
        print(f"{row['dtype']:<8} {row['generated ms']:>10.2f} {row['pytorch ms']:>10.2f} "
              f"{row['ratio']:>6.2f} {row['pytorch sparse ms']:>13.2f}")
    worst = max(row["ratio"] for row in rows)
    print(f"goal: generated <= {GOAL}x PyTorch's dense gradient: "
          f"{'met' if worst <= GOAL else 'NOT met'} (worst ratio {worst:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
