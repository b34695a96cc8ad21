"""Reference side of the MLP benchmark: a hand-written numpy forward+backward pass.

The network (default widths ``(784, 1024, 1024, 1024, 10)``)::

    x -> [Linear -> BatchNorm1d (train mode) -> ReLU] x 3 -> Linear -> softmax cross-entropy

* ``Linear``: ``z = h @ W + b`` with ``W`` of shape ``(in, out)``.
* ``BatchNorm1d``: batch statistics, biased batch variance, ``eps = 1e-5``.
* Loss: mean over the batch of the softmax cross-entropy with integer labels.

Parameters live in a flat dict: ``fc1.W, fc1.b, bn1.gamma, bn1.beta, fc2.W, ..., bn3.beta,
out.W, out.b``.  Gradients are returned for every parameter, never for the input ``x``.

What this module provides (none of it imports ``symbp``):

* :func:`make_params`, :func:`make_batch`: deterministic problem set-up.
* :func:`handwritten_loss_and_grads`: the careful, fast numpy reference.  It keeps the
  input dtype (float32 stays float32), writes into preallocated buffers
  (:class:`MLPWorkspace`), uses BLAS GEMV for column sums, a stable log-softmax, the
  compact batch-norm backward and the stored ReLU mask.
* :func:`gemm_only`: the 11 matrix products that forward+backward needs and nothing else,
  a lower bound for any implementation that uses the same BLAS.
* :func:`torch_loss_and_grads`: the same network in eager PyTorch (CPU autograd), or
  ``None`` when torch is not importable.
* :func:`time_alternating`, :func:`blas_threads`, :func:`run_in_subprocess`: timing helpers.

Run ``python benchmarks/reference_mlp.py --help`` for the command-line benchmark.

Measurement notes (2-core VM, AMD EPYC, numpy 2.4 with OpenBLAS 0.3.31, torch 2.13 CPU
with MKL): times vary by 10-20% between runs when anything else uses a core, so compare
ratios from one run.  Timing torch and numpy in one round-robin group with 2 threads made
the two thread pools fight (torch is timed as a separate group).  Torch's numbers depend
on the allocator state, see :data:`KEEP_FREED_MEMORY_ENV`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

DEFAULT_WIDTHS: tuple[int, ...] = (784, 1024, 1024, 1024, 10)
BN_EPS = 1e-5
#: Matrix products in one forward+backward pass of the default network: one per Linear
#: layer forward, one dW per Linear layer, one dX per Linear layer except the first.
N_GEMMS = 11

_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Variables some machines' environments set (this project's development and CI machines
#: among them) to force an older OpenBLAS kernel: on their AVX-512 processors, Haswell's AVX2
#: one, about half the speed of the kernel NumPy's OpenBLAS picks there by itself. PyTorch's
#: CPU kernels do not read them. ``--native-blas`` reruns a benchmark without them.
FORCED_KERNEL_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


#: glibc settings that keep freed memory in the process instead of returning it to the
#: kernel.  Eager torch allocates its outputs on every call; with glibc's defaults each
#: fresh multi-MB buffer can come back as new pages, costing one page fault per 4 KiB
#: (measured: ~2,000 faults and several ms per call for an 8 MB output), depending on
#: the allocator's history.  Set these in the environment of a fresh process (they are
#: read at start-up) to time the kernels rather than the page faults.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
}


# --------------------------------------------------------------------------- set-up


def _n_hidden(widths: tuple[int, ...]) -> int:
    if len(widths) < 3:
        raise ValueError(f"need at least one hidden layer, got widths={widths!r}")
    return len(widths) - 2


def param_shapes(widths: tuple[int, ...] = DEFAULT_WIDTHS) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, in forward order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(_n_hidden(widths)):
        fan_in, fan_out = widths[i], widths[i + 1]
        shapes[f"fc{i + 1}.W"] = (fan_in, fan_out)
        shapes[f"fc{i + 1}.b"] = (fan_out,)
        shapes[f"bn{i + 1}.gamma"] = (fan_out,)
        shapes[f"bn{i + 1}.beta"] = (fan_out,)
    shapes["out.W"] = (widths[-2], widths[-1])
    shapes["out.b"] = (widths[-1],)
    return shapes


def make_params(
    seed: int = 0, dtype=np.float32, widths: tuple[int, ...] = DEFAULT_WIDTHS
) -> dict[str, np.ndarray]:
    """He-initialised weights (``N(0, 2/fan_in)``), zero biases and betas, unit gammas."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(widths).items():
        if name.endswith(".W"):
            w = rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])
            params[name] = w.astype(dtype)
        elif name.endswith(".gamma"):
            params[name] = np.ones(shape, dtype=dtype)
        else:
            params[name] = np.zeros(shape, dtype=dtype)
    return params


def make_batch(
    seed: int = 0, dtype=np.float32, n: int = 256, widths: tuple[int, ...] = DEFAULT_WIDTHS
) -> tuple[np.ndarray, np.ndarray]:
    """A batch ``(x, y)``: ``x`` standard normal of shape ``(n, widths[0])``, ``y`` int64
    labels in ``[0, widths[-1])``."""
    rng = np.random.default_rng(seed + 1_000_003)
    x = rng.standard_normal((n, widths[0])).astype(dtype)
    y = rng.integers(0, widths[-1], size=n, dtype=np.int64)
    return x, y


def widths_of(params: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Recover the layer widths from a parameter dict."""
    widths = [params["fc1.W"].shape[0]]
    i = 1
    while f"fc{i}.W" in params:
        widths.append(params[f"fc{i}.W"].shape[1])
        i += 1
    widths.append(params["out.W"].shape[1])
    return tuple(widths)


# --------------------------------------------------------------------------- hand-written


PAGE = 4096
#: Page offset of every row-vector buffer (see :func:`aligned_empty`).
VECTOR_PAGE_OFFSET = 2048


def aligned_empty(shape, dtype, page_offset: int = 0) -> np.ndarray:
    """``np.empty`` whose data starts ``page_offset`` bytes into a 4 KiB page.

    Why: on the benchmark machine (AMD EPYC, numpy 2.4) a row-broadcast pass such as
    ``z -= mu`` with ``z`` of shape ``(256, 1024)`` ran 5-8x slower (0.4-0.9 ms instead of
    60-150 us) for some placements of the small vector ``mu`` relative to the big arrays.
    A freshly allocated vector (heap memory, any 16-byte offset) hit it in 20-40% of the
    placements tried; vectors on page-aligned big arrays plus a page offset that is a
    multiple of 256 bytes never did.  So the workspace allocates big arrays page-aligned
    and every broadcast vector at :data:`VECTOR_PAGE_OFFSET`.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + 2 * PAGE, dtype=np.uint8)
    start = (page_offset - raw.ctypes.data) % PAGE
    return raw[start : start + size].view(dtype).reshape(shape)


class MLPWorkspace:
    """Preallocated buffers for :func:`handwritten_loss_and_grads`.

    Per hidden layer ``i`` (width ``H``), all of shape ``(n, H)`` and page-aligned:

    * ``z[i]``: the pre-activation ``h @ W`` (the bias cancels in the BN), centred in place
      (``xhat`` is this times ``invstd[i]``, never materialised);
    * ``h[i]``: the post-ReLU activation (scratch for the variance in the forward pass; the
      ReLU output until the backward pass has used it for ``dW`` of layer ``i + 1``; then
      scratch again);
    * ``mask[i]``: the ReLU mask as 0/1 in the working dtype (a float mask multiplies about
      twice as fast as a bool one, which numpy has to cast on the fly);
    * ``g[i]``: the gradient with respect to ``h[i]``, turned in place into the gradient
      with respect to the BN output and then into ``dz``.

    Per hidden layer, vectors of length ``H`` (see :func:`aligned_empty` for why they are
    not plain temporaries): ``mean[i]`` (batch mean of ``h @ W``), ``invstd[i]``,
    ``gamma[i]``/``beta[i]`` (copies of the parameters), ``k[i]`` (scratch: ``gamma *
    invstd`` in the forward pass, then the backward's broadcast vectors).

    ``grads`` holds the returned gradient arrays: they are overwritten by the next call
    that uses the same workspace.
    """

    def __init__(self, n: int, widths: tuple[int, ...], dtype) -> None:
        self.n = n
        self.widths = tuple(widths)
        self.dtype = np.dtype(dtype)
        hidden = self.widths[1:-1]

        def big(h):
            return [aligned_empty((n, w), self.dtype) for w in h]

        def vec(h):
            return [aligned_empty((w,), self.dtype, VECTOR_PAGE_OFFSET) for w in h]

        self.z, self.h, self.mask, self.g = big(hidden), big(hidden), big(hidden), big(hidden)
        self.mean, self.invstd, self.k = vec(hidden), vec(hidden), vec(hidden)
        self.gamma, self.beta = vec(hidden), vec(hidden)
        self.logits = np.empty((n, self.widths[-1]), self.dtype)
        self.probs = np.empty((n, self.widths[-1]), self.dtype)
        self.mean_weights = np.full(n, 1.0 / n, self.dtype)  # mean over rows via GEMV
        self.ones = np.ones(n, self.dtype)  # column sums via GEMV
        self.rows = np.arange(n)
        self.grads = {
            name: np.empty(shape, self.dtype) for name, shape in param_shapes(widths).items()
        }

    @classmethod
    def for_inputs(cls, params: Mapping[str, np.ndarray], x: np.ndarray) -> MLPWorkspace:
        return cls(x.shape[0], widths_of(params), x.dtype)

    def fits(self, params: Mapping[str, np.ndarray], x: np.ndarray) -> bool:
        return x.shape[0] == self.n and x.dtype == self.dtype and widths_of(params) == self.widths


def handwritten_loss_and_grads(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    workspace: MLPWorkspace | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of every parameter, hand-derived, in numpy.

    ``x`` (``(n, widths[0])``) and all parameters must share one floating dtype; the whole
    computation stays in it.  ``y`` holds integer labels.  Pass a :class:`MLPWorkspace`
    (``MLPWorkspace.for_inputs(params, x)``) to reuse buffers across calls; the returned
    gradients then live in that workspace.  Without one, fresh buffers are allocated.
    """
    ws = workspace if workspace is not None else MLPWorkspace.for_inputs(params, x)
    if not ws.fits(params, x):
        raise ValueError("workspace does not match the parameters / batch")
    n = ws.n
    n_hidden = len(ws.z)
    grads = ws.grads

    # ---- forward -------------------------------------------------------------------
    h_prev = x
    for i in range(n_hidden):
        fc, bn = f"fc{i + 1}", f"bn{i + 1}"
        z, h, mask, mean, invstd = ws.z[i], ws.h[i], ws.mask[i], ws.mean[i], ws.invstd[i]
        gamma, beta, scale = ws.gamma[i], ws.beta[i], ws.k[i]
        np.copyto(gamma, params[f"{bn}.gamma"])
        np.copyto(beta, params[f"{bn}.beta"])

        np.matmul(h_prev, params[f"{fc}.W"], out=z)
        # Centre h @ W + b.  The bias cancels exactly: (hW + b) - mean(hW + b) equals
        # hW - mean(hW), so it is not added at all (one pass less).  Two-pass variance,
        # robust in float32.
        np.matmul(ws.mean_weights, z, out=mean)
        z -= mean
        np.multiply(z, z, out=h)
        np.matmul(ws.mean_weights, h, out=invstd)  # biased batch variance
        invstd += BN_EPS
        np.sqrt(invstd, out=invstd)
        np.reciprocal(invstd, out=invstd)
        # y = xhat * gamma + beta with xhat = z * invstd: fold invstd into the vector (one
        # pass less); xhat is never materialised, the backward folds invstd in as well.
        np.multiply(gamma, invstd, out=scale)
        np.multiply(z, scale, out=h)
        h += beta
        np.greater(h, 0, out=mask)  # 1.0 where the ReLU passes
        h *= mask
        h_prev = h

    logits = ws.logits
    np.matmul(h_prev, params["out.W"], out=logits)
    logits += params["out.b"]

    # Stable log-softmax: shift by the row max, log-sum-exp of the shifted logits.
    logits -= logits.max(axis=1, keepdims=True)
    probs = ws.probs
    np.exp(logits, out=probs)
    sumexp = probs.sum(axis=1, keepdims=True)
    # loss = mean_i (log sum_j exp(l_ij) - l_{i, y_i}), accumulated in float64
    loss = (
        float(np.log(sumexp).sum(dtype=np.float64))
        - float(logits[ws.rows, y].sum(dtype=np.float64))
    ) / n

    # ---- backward ------------------------------------------------------------------
    # dL/dlogits = (softmax - onehot) / n, built in place in `probs`
    sumexp *= n
    probs /= sumexp
    probs[ws.rows, y] -= 1.0 / n
    dlogits = probs

    np.matmul(h_prev.T, dlogits, out=grads["out.W"])
    np.matmul(ws.ones, dlogits, out=grads["out.b"])
    np.matmul(dlogits, params["out.W"].T, out=ws.g[-1])

    for i in reversed(range(n_hidden)):
        fc, bn = f"fc{i + 1}", f"bn{i + 1}"
        g, zc, mask, invstd, k = ws.g[i], ws.z[i], ws.mask[i], ws.invstd[i], ws.k[i]
        scratch = ws.h[i]  # h_i is no longer needed: dW of layer i+1 is done

        g *= mask  # ReLU backward: g is now dL/d(BN output)

        # BN backward, compact form (xhat = zc * invstd, zc the centred pre-activation):
        #   dbeta  = sum_rows(g),  dgamma = sum_rows(g * xhat) = invstd * sum_rows(g * zc)
        #   dz     = gamma * invstd / n * (n * g - dbeta - xhat * dgamma)
        dbeta = np.matmul(ws.ones, g, out=grads[f"{bn}.beta"])
        dgamma = np.einsum("ij,ij->j", g, zc, out=grads[f"{bn}.gamma"])
        dgamma *= invstd
        np.multiply(dgamma, invstd, out=k)
        k *= 1.0 / n
        np.multiply(zc, k, out=scratch)  # = xhat * dgamma / n
        g -= scratch
        np.multiply(dbeta, 1.0 / n, out=k)
        g -= k
        np.multiply(ws.gamma[i], invstd, out=k)
        g *= k  # g is now dz

        # Linear backward.  dL/db = sum_rows(dz) is zero in exact arithmetic (the bias
        # cancels in the BN); it is still computed, as the graph says, and comes out at
        # rounding level.
        np.matmul(ws.ones, g, out=grads[f"{fc}.b"])
        h_in = x if i == 0 else ws.h[i - 1]
        np.matmul(h_in.T, g, out=grads[f"{fc}.W"])
        if i > 0:
            np.matmul(g, params[f"{fc}.W"].T, out=ws.g[i - 1])

    return loss, grads


# --------------------------------------------------------------------------- GEMM only


@dataclass
class GemmOperands:
    """Non-parameter operands and outputs of the products in :func:`gemm_only`.

    Per hidden layer: ``acts[i]`` (a stand-in for the ReLU output ``h_i``), ``deltas[i]``
    (a stand-in for ``dz_i``), ``z_out[i]`` (forward output), ``dh_out[i]`` (output of the
    dX product that produces ``dL/dh_i``).  Plus ``dlogits``, ``logits_out`` and
    ``grads_out`` (one per weight matrix).  Values are random: GEMM speed does not depend
    on them (they are kept finite and normal-range).
    """

    acts: list[np.ndarray]
    deltas: list[np.ndarray]
    z_out: list[np.ndarray]
    dh_out: list[np.ndarray]
    dlogits: np.ndarray
    logits_out: np.ndarray
    grads_out: dict[str, np.ndarray]


def make_gemm_operands(
    params: Mapping[str, np.ndarray], x: np.ndarray, seed: int = 0
) -> GemmOperands:
    """Allocate (outside any timed region) the operands of :func:`gemm_only`."""
    widths = widths_of(params)
    n, dtype = x.shape[0], x.dtype
    rng = np.random.default_rng(seed)
    hidden = widths[1:-1]

    def rand(shape):  # page-aligned like the workspace of the hand-written pass
        a = aligned_empty(shape, dtype)
        a[...] = rng.standard_normal(shape)
        return a

    return GemmOperands(
        acts=[rand((n, h)) for h in hidden],
        deltas=[rand((n, h)) for h in hidden],
        z_out=[aligned_empty((n, h), dtype) for h in hidden],
        dh_out=[aligned_empty((n, h), dtype) for h in hidden],
        dlogits=rand((n, widths[-1])),
        logits_out=np.empty((n, widths[-1]), dtype),
        grads_out={
            name: np.empty(shape, dtype)
            for name, shape in param_shapes(widths).items()
            if name.endswith(".W")
        },
    )


def gemm_products(
    params: Mapping[str, np.ndarray], x: np.ndarray, ops: GemmOperands
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The ``(a, b, out)`` triples of the products forward+backward needs, with the same
    operand layouts (transposed views included) as :func:`handwritten_loss_and_grads`."""
    n_hidden = len(ops.acts)
    products = []
    # forward: one per Linear layer
    h_in = x
    for i in range(n_hidden):
        products.append((h_in, params[f"fc{i + 1}.W"], ops.z_out[i]))
        h_in = ops.acts[i]
    products.append((h_in, params["out.W"], ops.logits_out))
    # backward: dW for every Linear layer, dX for all but the first
    products.append((ops.acts[-1].T, ops.dlogits, ops.grads_out["out.W"]))
    products.append((ops.dlogits, params["out.W"].T, ops.dh_out[-1]))
    for i in reversed(range(n_hidden)):
        h_in = x if i == 0 else ops.acts[i - 1]
        products.append((h_in.T, ops.deltas[i], ops.grads_out[f"fc{i + 1}.W"]))
        if i > 0:
            products.append((ops.deltas[i], params[f"fc{i + 1}.W"].T, ops.dh_out[i - 1]))
    return products


def gemm_only(params: Mapping[str, np.ndarray], x: np.ndarray, ops: GemmOperands) -> None:
    """Run exactly the matrix products of one forward+backward pass (11 for the default
    network) and nothing else.  Build ``ops`` with :func:`make_gemm_operands` first."""
    for a, b, out in gemm_products(params, x, ops):
        np.matmul(a, b, out=out)


# --------------------------------------------------------------------------- torch


def torch_loss_and_grads(
    params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, threads: int = 1
) -> Callable[[], tuple[float, dict[str, np.ndarray]]] | None:
    """The same network in eager PyTorch on the CPU, or ``None`` if torch is missing.

    Returns a callable that clears the gradients, runs forward + ``loss.backward()`` and
    returns ``(loss, grads)`` (grads are numpy views of the torch ``.grad`` tensors).
    Parameters are copied in with their dtype.  ``torch.set_num_threads(threads)`` is
    process-wide: it is set here and re-set by the callable if something changed it.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    torch.set_num_threads(threads)
    tparams = {
        k: torch.from_numpy(np.array(v, copy=True)).requires_grad_() for k, v in params.items()
    }
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n_hidden = _n_hidden(widths_of(params))

    def step() -> tuple[float, dict[str, np.ndarray]]:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for p in tparams.values():
            p.grad = None  # what Optimizer.zero_grad() does by default
        h = xt
        for i in range(1, n_hidden + 1):
            z = torch.addmm(tparams[f"fc{i}.b"], h, tparams[f"fc{i}.W"])
            z = F.batch_norm(
                z,
                None,
                None,
                tparams[f"bn{i}.gamma"],
                tparams[f"bn{i}.beta"],
                training=True,
                eps=BN_EPS,
            )
            h = F.relu(z)
        logits = torch.addmm(tparams["out.b"], h, tparams["out.W"])
        loss = F.cross_entropy(logits, yt)
        loss.backward()
        return float(loss.detach()), {k: p.grad.numpy() for k, p in tparams.items()}

    return step


def torch_gemm_only(
    params: Mapping[str, np.ndarray], x: np.ndarray, threads: int = 1, seed: int = 0
) -> Callable[[], None] | None:
    """The products of :func:`gemm_only` done with ``torch.mm`` (torch's own BLAS, MKL in
    the usual wheels), or ``None`` if torch is missing.  Separates "torch's GEMMs are
    slower/faster" from "torch's overhead" when reading the torch ratio."""
    try:
        import torch
    except ImportError:
        return None

    torch.set_num_threads(threads)
    ops = make_gemm_operands(params, x, seed)
    tparams = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()}
    xt = torch.from_numpy(np.ascontiguousarray(x))
    products = gemm_products(tparams, xt, _torch_operands(torch, ops))

    def step() -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for a, b, out in products:
            torch.mm(a, b, out=out)

    return step


def _torch_operands(torch, ops: GemmOperands) -> GemmOperands:
    def t(a):
        return torch.from_numpy(a)

    return GemmOperands(
        acts=[t(a) for a in ops.acts],
        deltas=[t(a) for a in ops.deltas],
        z_out=[t(a) for a in ops.z_out],
        dh_out=[t(a) for a in ops.dh_out],
        dlogits=t(ops.dlogits),
        logits_out=t(ops.logits_out),
        grads_out={k: t(a) for k, a in ops.grads_out.items()},
    )


# --------------------------------------------------------------------------- timing


def time_alternating_with_cpu(
    fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median CPU time of this process (seconds) of each callable,
    measured round-robin.

    Every round runs each callable once, starting one further along the list each round,
    so that slow drifts of the machine (frequency, neighbours) hit all of them alike.
    The garbage collector is paused while timing.  With one BLAS thread the CPU time is the
    more robust figure on a machine shared with other jobs (waiting for a core does not
    count); with two threads it adds up both threads' work.
    """
    names = list(fns)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return (
        {name: statistics.median(s) for name, s in wall.items()},
        {name: statistics.median(s) for name, s in cpu.items()},
    )


def time_in_blocks(
    fns: Mapping[str, Callable[[], object]], blocks: int = 7, per_block: int = 3
) -> dict[str, list[float]]:
    """Each callable's median wall time (seconds) in each of ``blocks`` blocks.

    A block times each callable ``per_block`` times in a row (after one untimed call), one
    callable after the other, starting one further along the list each block. For callables
    that must not alternate call by call (NumPy's and PyTorch's thread pools fight) but must be
    compared at the same moment: a drift of the machine hits neighbouring blocks alike, so the
    ratio of two callables' medians taken block by block (:func:`median_ratio`) cancels it.
    """
    names = list(fns)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        k = b % len(names)
        for name in names[k:] + names[:k]:
            timed = time_alternating({name: fns[name]}, repeats=per_block, warmup=1)
            medians[name].append(timed[name])
    return medians


def time_blocks(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int, per_block: int = 5
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``warmup`` untimed calls of each callable, then :func:`time_in_blocks` with about
    ``repeats`` timed calls each (``per_block`` in a row, at least 3 blocks).  Returns each
    callable's median over the blocks and the block medians themselves (for
    :func:`median_ratio`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    blocks = time_in_blocks(fns, blocks=max(repeats // per_block, 3), per_block=per_block)
    return {name: statistics.median(medians) for name, medians in blocks.items()}, blocks


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over blocks of the ratio of two callables' times in the same block."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def time_alternating(
    fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median wall time (seconds) of each callable, measured round-robin
    (:func:`time_alternating_with_cpu`)."""
    return time_alternating_with_cpu(fns, repeats=repeats, warmup=warmup)[0]


def _env_threads() -> int | None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit numpy's BLAS to ``n`` threads for the block.

    Uses ``threadpoolctl`` when importable.  Without it the thread count can only be
    chosen through ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` set before numpy is
    imported: the block then runs only if those already say ``n`` (else ``RuntimeError``;
    use :func:`run_in_subprocess`).  Torch threads are set separately, through the
    ``threads`` argument of the torch factories.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if _env_threads() != n:
            raise RuntimeError(
                f"cannot set BLAS threads to {n}: threadpoolctl is not installed and "
                "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS must be set before numpy is imported; "
                "use run_in_subprocess()"
            ) from None
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def common_arguments(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    """The options every benchmark here takes: ``--threads``, ``--repeats``, ``--warmup``,
    ``--no-torch``, ``--json``."""
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def rerun_keeping_freed_memory(script: str, argv: list[str] | None) -> int:
    """Run ``script`` again in a child process with :data:`KEEP_FREED_MEMORY_ENV` and the same
    arguments less ``--keep-freed-memory``; its exit status."""
    return rerun_with_env(script, _without_flag(argv, "--keep-freed-memory"), KEEP_FREED_MEMORY_ENV)


def _without_flag(argv: list[str] | None, flag: str) -> list[str]:
    """``argv`` (default: this process's arguments) less ``flag`` and its abbreviations (which
    argparse accepts): a child rerun without them does not rerun itself again."""
    given = argv if argv is not None else sys.argv[1:]
    return [a for a in given if not (len(a) > 2 and a.startswith("--") and flag.startswith(a))]


def rerun_with_env(
    script: str, argv: list[str] | None, env: Mapping[str, str], drop: tuple[str, ...] = ()
) -> int:
    """Run ``script`` with ``argv`` (default: this process's arguments) in a child process whose
    environment adds ``env`` (variables a library reads when it loads) and lacks the variables
    in ``drop``; its exit status."""
    given = argv if argv is not None else sys.argv[1:]
    child_env = {k: v for k, v in {**os.environ, **env}.items() if k not in drop}
    return subprocess.run([sys.executable, script, *given], env=child_env).returncode


def add_native_blas_argument(parser: argparse.ArgumentParser) -> None:
    """``--native-blas``: see :func:`rerun_with_native_blas`."""
    parser.add_argument(
        "--native-blas",
        action="store_true",
        help="rerun in a child process without " + " and ".join(FORCED_KERNEL_VARS)
        + ", so that NumPy's OpenBLAS runs the kernel it picks for this processor (as on a "
        "machine whose environment does not force one)",
    )


def rerun_with_native_blas(script: str, argv: list[str] | None, asked: bool) -> int | None:
    """When ``asked`` (``--native-blas`` was given) and the environment forces a kernel: run
    ``script`` again without :data:`FORCED_KERNEL_VARS` and that flag, and return its exit
    status; otherwise None (nothing to do: carry on in this process)."""
    if not asked or not any(v in os.environ for v in FORCED_KERNEL_VARS):
        return None
    return rerun_with_env(script, _without_flag(argv, "--native-blas"), {}, drop=FORCED_KERNEL_VARS)


def blas_description() -> str:
    """NumPy's BLAS library, its version and kernel, and the variables forcing that kernel."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS: unknown (threadpoolctl is not installed)"
    np.ones(2) @ np.ones(2)  # NumPy's BLAS is loaded
    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not found:
        return "BLAS: unknown"
    info = found[0]
    forced = [f"{v}={os.environ[v]}" for v in FORCED_KERNEL_VARS if v in os.environ]
    text = f"BLAS: {info.get('internal_api')} {info.get('version')}"
    text += f", kernel {info.get('architecture')}"
    return text + (f" (forced by {', '.join(forced)}; --native-blas to lift)" if forced else "")


def run_in_subprocess(
    threads: int,
    args: list[str] | tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> list[dict]:
    """Run this file's benchmark in a fresh interpreter whose BLAS/OpenMP/MKL thread
    environment variables say ``threads`` (works without threadpoolctl).  ``args`` are
    extra command-line arguments (e.g. ``["--dtypes", "float32"]``); ``env`` adds
    environment variables (e.g. :data:`KEEP_FREED_MEMORY_ENV`).  Returns the parsed
    ``--json`` output."""
    env = {**os.environ, **(env or {})}
    for var in _THREAD_ENV_VARS:
        env[var] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--threads", str(threads)]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- benchmark


def benchmark_mlp(
    dtype=np.float32,
    threads: int = 1,
    batch: int = 256,
    repeats: int = 20,
    warmup: int = 3,
    include_torch: bool = True,
    widths: tuple[int, ...] = DEFAULT_WIDTHS,
) -> dict:
    """Median times (seconds) at one dtype and thread count: the hand-written pass and the
    GEMMs alone (measured alternately), then, if torch is available, torch eager and
    torch's GEMMs alone (alternately, as a second group)."""
    params = make_params(0, dtype, widths)
    x, y = make_batch(0, dtype, batch, widths)
    ws = MLPWorkspace.for_inputs(params, x)
    ops = make_gemm_operands(params, x)
    fns: dict[str, Callable[[], object]] = {
        "handwritten": lambda: handwritten_loss_and_grads(params, x, y, ws),
        "gemm_only": lambda: gemm_only(params, x, ops),
    }
    with blas_threads(threads):
        times = time_alternating(fns, repeats=repeats, warmup=warmup)
    # Torch is timed in a group of its own: interleaving its OpenMP/MKL thread pool with
    # OpenBLAS's makes the two pools fight over the cores when threads > 1.
    step = torch_loss_and_grads(params, x, y, threads) if include_torch else None
    if step is not None:
        torch_fns = {"torch": step, "torch_gemm_only": torch_gemm_only(params, x, threads)}
        with blas_threads(threads):
            times.update(time_alternating(torch_fns, repeats=repeats, warmup=warmup))
    result = {
        "dtype": np.dtype(dtype).name,
        "threads": threads,
        "batch": batch,
        "times_s": times,
        "ratio_handwritten_over_gemm": times["handwritten"] / times["gemm_only"],
    }
    if "torch" in times:
        result["ratio_torch_over_gemm"] = times["torch"] / times["gemm_only"]
        result["ratio_torch_over_torch_gemm"] = times["torch"] / times["torch_gemm_only"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, repeats=20, warmup=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="one fresh interpreter per thread count, threads set by env vars",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="with --subprocess: set KEEP_FREED_MEMORY_ENV in the child processes",
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory and not args.subprocess:
        parser.error("--keep-freed-memory needs --subprocess (glibc reads it at start-up)")

    results: list[dict] = []
    for threads in args.threads:
        if args.subprocess:
            extra = [
                "--dtypes",
                *args.dtypes,
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
            ]
            if args.no_torch:
                extra.append("--no-torch")
            env = KEEP_FREED_MEMORY_ENV if args.keep_freed_memory else None
            results.extend(run_in_subprocess(threads, extra, env))
            continue
        for dtype in args.dtypes:
            results.append(
                benchmark_mlp(
                    np.dtype(dtype),
                    threads,
                    args.batch,
                    args.repeats,
                    args.warmup,
                    include_torch=not args.no_torch,
                )
            )

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        t = r["times_s"]
        line = (
            f"{r['dtype']:>8} threads={r['threads']} batch={r['batch']}: "
            f"handwritten {t['handwritten'] * 1e3:8.2f} ms  "
            f"gemm_only {t['gemm_only'] * 1e3:8.2f} ms  "
            f"ratio {r['ratio_handwritten_over_gemm']:.3f}"
        )
        if "torch" in t:
            line += (
                f"  | torch {t['torch'] * 1e3:8.2f} ms "
                f"(/numpy gemm {r['ratio_torch_over_gemm']:.3f}, "
                f"torch gemm {t['torch_gemm_only'] * 1e3:.2f} ms, "
                f"/torch gemm {r['ratio_torch_over_torch_gemm']:.3f})"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
