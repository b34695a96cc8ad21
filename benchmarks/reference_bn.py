"""Reference side of the batch-norm backward benchmark (float64, train mode).

Given the upstream gradient ``dy`` and what the forward pass saved (``xhat``, ``invstd``)
plus ``gamma``, the backward of ``y = gamma * xhat + beta`` with batch statistics is, in
its compact form (``n`` rows)::

    dbeta  = sum_rows(dy)
    dgamma = sum_rows(dy * xhat)
    dx     = gamma * invstd / n * (n * dy - dbeta - xhat * dgamma)

:func:`numpy_bn_backward` is the fastest plain-numpy version found on the benchmark
machine (see its docstring); :func:`torch_bn_backward_factory` wraps torch's native
kernel.  Shapes benchmarked: :data:`SHAPES`.  Nothing here imports ``symbp``.

Run ``python benchmarks/reference_bn.py --help`` for the command-line benchmark.  Torch's
times depend heavily on whether its freshly allocated outputs page-fault, see
``reference_mlp.KEEP_FREED_MEMORY_ENV``; for kernel-to-kernel numbers run e.g.
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python
benchmarks/reference_bn.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

BN_EPS = 1e-5
SHAPES: tuple[tuple[int, int], ...] = ((256, 1024), (4096, 256))


class BNInputs(NamedTuple):
    """A forward pass's saved state plus an upstream gradient, all float64."""

    x: np.ndarray  # (n, h) forward input
    dy: np.ndarray  # (n, h) upstream gradient
    xhat: np.ndarray  # (n, h) normalised input
    gamma: np.ndarray  # (h,)
    beta: np.ndarray  # (h,)
    mean: np.ndarray  # (h,) batch mean
    invstd: np.ndarray  # (h,) 1 / sqrt(biased batch var + eps)


def bn_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = BN_EPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain train-mode batch norm: returns ``(y, xhat, mean, invstd)`` (two-pass var)."""
    mean = x.mean(axis=0)
    centred = x - mean
    invstd = 1.0 / np.sqrt((centred * centred).mean(axis=0) + eps)
    xhat = centred * invstd
    return gamma * xhat + beta, xhat, mean, invstd


def make_bn_inputs(shape: tuple[int, int], seed: int = 0) -> BNInputs:
    """Deterministic float64 inputs: ``x`` with per-column offsets and scales, random
    ``gamma``/``beta``, standard normal ``dy``; ``xhat``/``mean``/``invstd`` from
    :func:`bn_forward`."""
    rng = np.random.default_rng(seed)
    n, h = shape
    x = rng.standard_normal((n, h)) * rng.uniform(0.5, 2.0, h) + rng.uniform(-1.0, 1.0, h)
    gamma = rng.uniform(0.5, 1.5, h)
    beta = rng.uniform(-0.5, 0.5, h)
    dy = rng.standard_normal((n, h))
    _, xhat, mean, invstd = bn_forward(x, gamma, beta)
    return BNInputs(x, dy, xhat, gamma, beta, mean, invstd)


def bn_vector(h: int) -> np.ndarray:
    """A length-``h`` float64 scratch vector for :func:`numpy_bn_backward`, placed where
    row-broadcast passes run at full speed (see ``reference_mlp.aligned_empty``)."""
    mlp = _sibling("reference_mlp")
    return mlp.aligned_empty((h,), np.float64, mlp.VECTOR_PAGE_OFFSET)


def numpy_bn_backward(
    dy: np.ndarray,
    xhat: np.ndarray,
    gamma: np.ndarray,
    invstd: np.ndarray,
    out: np.ndarray | None = None,
    vec: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact batch-norm backward: returns ``(dx, dgamma, dbeta)``.

    ``out`` optionally receives ``dx`` (shape of ``dy``, not ``dy`` itself); ``vec`` is an
    optional scratch vector from :func:`bn_vector`.  Choices, each measured against the
    alternatives on the benchmark machine:

    * ``dbeta`` by a BLAS GEMV ``ones @ dy`` (faster than ``dy.sum(axis=0)``);
    * ``dgamma`` by ``einsum("ij,ij->j")``, which never materialises ``dy * xhat``
      (faster than a product into scratch followed by a GEMV);
    * ``dx`` in four passes over the output buffer and no other big array:
      ``dx = xhat * (dgamma/n)``, ``dx = dy - dx``, ``dx -= dbeta/n``,
      ``dx *= gamma * invstd``.  Row-blocking these passes to keep them in L2 gained
      under 10% at (4096, 256) and lost at (256, 1024), so it is not done;
    * the three broadcast vectors are computed one after the other into ``vec``, a
      buffer at a page offset where broadcasting over rows is never slow (a plain
      temporary was 5-8x slower per pass in 20-40% of placements on that machine).
    """
    n, h = dy.shape
    if out is dy:
        raise ValueError("out must not be dy")
    dx = np.empty_like(dy) if out is None else out
    k = bn_vector(h) if vec is None else vec
    dbeta = np.ones(n, dtype=dy.dtype) @ dy
    dgamma = np.einsum("ij,ij->j", dy, xhat)
    np.multiply(dgamma, 1.0 / n, out=k)
    np.multiply(xhat, k, out=dx)
    np.subtract(dy, dx, out=dx)
    np.multiply(dbeta, 1.0 / n, out=k)
    dx -= k
    np.multiply(gamma, invstd, out=k)
    dx *= k
    return dx, dgamma, dbeta


def torch_bn_backward_factory(
    inputs: BNInputs, threads: int = 1, mode: str = "native"
) -> Callable[[], tuple] | None:
    """Torch's batch-norm backward on the same data, or ``None`` if torch is missing.

    ``mode="native"``: ``torch.ops.aten.native_batch_norm_backward`` on the saved mean and
    invstd (backward only, the like-for-like comparison with :func:`numpy_bn_backward`).
    ``mode="autograd"``: forward through ``torch.nn.functional.batch_norm`` plus
    ``backward(dy)`` (so forward time is included).  The callable returns torch tensors
    ``(dx, dgamma, dbeta)``.  ``torch.set_num_threads(threads)`` is process-wide.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    torch.set_num_threads(threads)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs._asdict().items()}

    if mode == "native":
        op = torch.ops.aten.native_batch_norm_backward

        def native() -> tuple:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return op(
                t["dy"],
                t["x"],
                t["gamma"],
                None,
                None,
                t["mean"],
                t["invstd"],
                True,
                BN_EPS,
                [True, True, True],
            )

        return native

    if mode == "autograd":
        x = t["x"].clone().requires_grad_()
        gamma = t["gamma"].clone().requires_grad_()
        beta = t["beta"].clone().requires_grad_()

        def autograd() -> tuple:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            for p in (x, gamma, beta):
                p.grad = None
            y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=BN_EPS)
            y.backward(t["dy"])
            return x.grad, gamma.grad, beta.grad

        return autograd

    raise ValueError(f"unknown mode {mode!r}; expected 'native' or 'autograd'")


# --------------------------------------------------------------------------- benchmark


def _sibling(name: str):
    """Import a module that sits next to this file (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def benchmark_bn(
    shape: tuple[int, int],
    threads: int = 1,
    repeats: int = 50,
    warmup: int = 5,
    include_torch: bool = True,
) -> dict:
    """Median times (seconds) of the numpy and (if available) torch native backward at
    one shape, timed in alternating blocks (ratio: the median of the block-by-block ratios)."""
    mlp = _sibling("reference_mlp")
    inp = make_bn_inputs(shape)
    dx = mlp.aligned_empty(shape, np.float64)
    vec = bn_vector(shape[1])
    fns: dict[str, Callable[[], object]] = {
        "numpy": lambda: numpy_bn_backward(
            inp.dy, inp.xhat, inp.gamma, inp.invstd, out=dx, vec=vec
        ),
    }
    native = torch_bn_backward_factory(inp, threads, "native") if include_torch else None
    if native is not None:
        fns["torch_native"] = native
    # Blocks of calls, not call by call: interleaved with numpy call by call, torch's per-call
    # 2-8 MB output allocations and its thread pool were measured to slow it down 2-4x.
    with mlp.blas_threads(threads):
        times, blocks = mlp.time_blocks(fns, repeats, warmup)
    result = {"shape": list(shape), "threads": threads, "times_s": times}
    if "torch_native" in times:
        result["ratio_numpy_over_torch"] = mlp.median_ratio(blocks["numpy"], blocks["torch_native"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _sibling("reference_mlp").common_arguments(parser, repeats=50, warmup=5)
    args = parser.parse_args(argv)
    results = [
        benchmark_bn(shape, threads, args.repeats, args.warmup, not args.no_torch)
        for threads in args.threads
        for shape in SHAPES
    ]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        t = r["times_s"]
        line = f"shape={tuple(r['shape'])} threads={r['threads']}: numpy {t['numpy'] * 1e6:8.1f} us"
        if "torch_native" in t:
            line += (
                f"  torch native {t['torch_native'] * 1e6:8.1f} us  "
                f"numpy/torch {r['ratio_numpy_over_torch']:.2f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
