"""Convolutional nets: symbp's generated module against hand-written im2col numpy and PyTorch.

Two networks (issue #5), softmax cross-entropy, training mode, forward + backward:

* ``lenet``: examples/lenet.toml (conv 1->6 5x5, ReLU, max-pool 2, conv 6->16 5x5, ReLU,
  max-pool 2, flatten, linear 120, 84, 10) on 28x28 images, batch 128;
* ``wide``: conv 3->64 3x3 pad 1, BN, ReLU, conv 64->64 3x3 pad 1, BN, ReLU, max-pool 2,
  flatten, linear 10 on 32x32 images, batch 64.

The hand-written reference (:func:`handwritten_loss_and_grads`, no symbp import) is careful
numpy: im2col through ``sliding_window_view`` and one GEMM per convolution, col2im as a
scatter-add over the kernel offsets, the compact batch-norm backward per channel, max pooling
by reshaping (kernel = stride) with a first-arg-max mask. Times are medians of round-robin
repeats in one process (:func:`reference_mlp.time_alternating`), with 1 and 2 BLAS threads;
PyTorch (eager, CPU) runs with the same thread count where it is installed; for the ratio to
PyTorch, the generated pass and PyTorch's are timed alone, in alternating blocks (see
:func:`run`).

    python benchmarks/conv_vs_numpy.py [--dtype float32|float64] [--repeats 7] [--quick]
                                       [--keep-freed-memory] [--helper-threads]

Prints, per net and thread count, the times and the ratios generated / hand-written and
generated / PyTorch; then, per net, what backward keeps (``benchmarks/memory_kept.py``): the
bytes of the generated cache (each array once, a view counted as the array it views), of the
tensors PyTorch's autograd saves (``saved_tensors_hooks``, each storage once, parameters
aside) and the minimum the derived backward needs (``symbp.flow.memory.minimum_bytes``).

The generated pass is timed round-robin with the hand-written one, then alone in blocks of
three calls that alternate with blocks of PyTorch's (:func:`reference_mlp.time_in_blocks`): the
printed generated/PyTorch ratio is the median of the block-by-block ratios, which cancels the
machine's drift from minute to minute.

The generated module and the hand-written pass allocate fresh arrays on every call; with
glibc's default settings the big ones go back to the kernel when freed and page-fault in
again on the next call, and how much of that a run pays depends on what ran just before it
(timed next to the hand-written pass, the generated LeNet pass took 27 ms instead of 18 ms).
``--keep-freed-memory`` reruns the benchmark in a child process with
``reference_mlp.KEEP_FREED_MEMORY_ENV`` (glibc keeps freed blocks of up to 32 MB; bigger ones,
such as the wide net's 150 MB im2col matrices, are still mapped afresh on every call).

``--helper-threads`` gives the generated module's array helpers (window copies, col2im,
pooling) as many threads as BLAS has (its ``set_threads``; by default they use one). It reruns
the benchmark in a child process with ``OPENBLAS_THREAD_TIMEOUT=4``: NumPy's OpenBLAS keeps
its idle threads spinning for a while after every matrix product, and a helper thread that
shares a core with a spinning one loses more than it gains; with the variable they sleep at
once. The hand-written pass runs under the same setting (it has no threads of its own).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import memory_kept  # noqa: E402
from reference_mlp import (  # noqa: E402
    add_native_blas_argument,
    blas_description,
    blas_threads,
    median_ratio,
    rerun_keeping_freed_memory,
    rerun_with_env,
    rerun_with_native_blas,
    time_alternating,
    time_in_blocks,
)

#: Set before NumPy loads by ``--helper-threads``: OpenBLAS's idle threads sleep at once.
HELPER_THREADS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}

EPS = 1e-5


# --------------------------------------------------------------------------- the networks


def layers(name: str) -> list[dict]:
    """The network as plain dicts (the same as the TOML spec's layers)."""
    if name == "lenet":
        return [
            {"type": "conv2d", "name": "conv1", "out_channels": 6, "kernel": 5},
            {"type": "relu"},
            {"type": "maxpool2d", "name": "pool1", "kernel": 2},
            {"type": "conv2d", "name": "conv2", "out_channels": 16, "kernel": 5},
            {"type": "relu"},
            {"type": "maxpool2d", "name": "pool2", "kernel": 2},
            {"type": "flatten"},
            {"type": "linear", "name": "fc1", "out": 120},
            {"type": "relu"},
            {"type": "linear", "name": "fc2", "out": 84},
            {"type": "relu"},
            {"type": "linear", "name": "out", "out": 10},
        ]
    return [
        {"type": "conv2d", "name": "conv1", "out_channels": 64, "kernel": 3, "padding": 1},
        {"type": "batchnorm", "name": "bn1"},
        {"type": "relu"},
        {"type": "conv2d", "name": "conv2", "out_channels": 64, "kernel": 3, "padding": 1},
        {"type": "batchnorm", "name": "bn2"},
        {"type": "relu"},
        {"type": "maxpool2d", "name": "pool", "kernel": 2},
        {"type": "flatten"},
        {"type": "linear", "name": "out", "out": 10},
    ]


SHAPES = {"lenet": ((1, 28, 28), 128), "wide": ((3, 32, 32), 64)}


def spec_text(name: str, shape=None) -> str:
    shape = shape or SHAPES[name][0]
    lines = [f'name = "{name}"', f"input = {{ shape = {list(shape)} }}",
             'loss = "softmax_cross_entropy"']
    for layer in layers(name):
        lines.append("\n[[layers]]")
        for key, value in layer.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- hand-written


def conv_forward(x, weight, bias, padding):
    """Cross-correlation, stride 1: im2col (one copy) and one GEMM."""
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out, channels, kh, kw = weight.shape
    n = x.shape[0]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))  # n, c, p, q, i, j
    rows, columns = windows.shape[2:4]
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * rows * columns, channels * kh * kw)
    y = cols @ weight.reshape(out, -1).T
    if bias is not None:
        y += bias
    return y.reshape(n, rows, columns, out).transpose(0, 3, 1, 2), (cols, x.shape)


def conv_backward(dy, cache, weight, padding, input_grad=True):
    cols, padded_shape = cache
    out, channels, kh, kw = weight.shape
    n, _, rows, columns = dy.shape
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, out)
    dweight = (dy_mat.T @ cols).reshape(weight.shape)
    dbias = dy_mat.sum(axis=0)
    if not input_grad:
        return None, dweight, dbias
    dcols = (dy_mat @ weight.reshape(out, -1)).reshape(n, rows, columns, channels, kh, kw)
    dx = np.zeros(padded_shape, dtype=dy.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + rows, j : j + columns] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    if padding:
        dx = dx[:, :, padding:-padding, padding:-padding]
    return dx, dweight, dbias


def maxpool_forward(x):
    """2x2 max pooling, stride 2, by reshaping; the mask marks each window's first maximum."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    flat = windows.reshape(n, c, h // 2, w // 2, 4)
    first = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, first[..., None], axis=-1)[..., 0]
    return y, (first, x.shape)


def maxpool_backward(dy, cache):
    first, shape = cache
    n, c, h, w = shape
    dflat = np.zeros((*dy.shape, 4), dtype=dy.dtype)
    np.put_along_axis(dflat, first[..., None], dy[..., None], axis=-1)
    return dflat.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(shape)


def bn2d_forward(x, gamma, beta):
    mean = x.mean(axis=(0, 2, 3))
    centred = x - mean[:, None, None]
    var = np.einsum("nchw,nchw->c", centred, centred) / (x.size // x.shape[1])
    invstd = 1 / np.sqrt(var + EPS)
    xhat = centred * invstd[:, None, None]
    return xhat * gamma[:, None, None] + beta[:, None, None], (xhat, invstd)


def bn2d_backward(dy, cache, gamma):
    xhat, invstd = cache
    count = dy.size // dy.shape[1]
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = np.einsum("nchw,nchw->c", dy, xhat)
    # The means first (dy - mean(dy) - xhat*mean(dy*xhat)): N*dy - sum(dy) cancels badly in
    # float32 when N = batch*H*W is large.
    dx = xhat * (dgamma / count)[:, None, None]
    np.subtract(dy, dx, out=dx)
    dx -= (dbeta / count)[:, None, None]
    dx *= (gamma * invstd)[:, None, None]
    return dx, dgamma, dbeta


def handwritten_loss_and_grads(net: str, params, x, y):
    """Forward + backward of :func:`layers` ``net``, written by hand."""
    caches, grads = [], {}
    h = x
    for layer in layers(net):
        kind, name = layer["type"], layer.get("name")
        if kind == "conv2d":
            h, cache = conv_forward(h, params[f"{name}.W"], params.get(f"{name}.b"),
                                    layer.get("padding", 0))
        elif kind == "batchnorm":
            h, cache = bn2d_forward(h, params[f"{name}.gamma"], params[f"{name}.beta"])
        elif kind == "relu":
            cache = h > 0
            h = h * cache
        elif kind == "maxpool2d":
            h, cache = maxpool_forward(h)
        elif kind == "flatten":
            cache = h.shape
            h = h.reshape(len(h), -1)
        else:
            cache = h
            h = h @ params[f"{name}.W"] + params[f"{name}.b"]
        caches.append(cache)
    shifted = h - h.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(np.log(total[:, 0]) - shifted[np.arange(n), y]))
    dh = exp / total
    dh[np.arange(n), y] -= 1
    dh /= n
    for position in range(len(caches) - 1, -1, -1):
        layer, cache = layers(net)[position], caches[position]
        kind, name = layer["type"], layer.get("name")
        if kind == "conv2d":
            dh, grads[f"{name}.W"], grads[f"{name}.b"] = conv_backward(
                dh, cache, params[f"{name}.W"], layer.get("padding", 0), input_grad=position > 0)
        elif kind == "batchnorm":
            dh, grads[f"{name}.gamma"], grads[f"{name}.beta"] = bn2d_backward(
                dh, cache, params[f"{name}.gamma"])
        elif kind == "relu":
            dh = dh * cache
        elif kind == "maxpool2d":
            dh = maxpool_backward(dh, cache)
        elif kind == "flatten":
            dh = dh.reshape(cache)
        else:
            grads[f"{name}.W"] = cache.T @ dh
            grads[f"{name}.b"] = dh.sum(axis=0)
            dh = dh @ params[f"{name}.W"].T
    return loss, grads


# --------------------------------------------------------------------------- PyTorch


def torch_loss_and_grads_factory(net: str, params, x, y):
    """A closure running the net in eager PyTorch, or ``None`` when torch is missing."""
    try:
        import torch
    except ImportError:
        return None
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx, ty = torch.tensor(x), torch.tensor(y)
    spec = layers(net)

    def run():
        for tensor in tensors.values():
            tensor.grad = None
        h = tx
        for layer in spec:
            kind, name = layer["type"], layer.get("name")
            if kind == "conv2d":
                h = torch.nn.functional.conv2d(h, tensors[f"{name}.W"], tensors[f"{name}.b"],
                                               padding=layer.get("padding", 0))
            elif kind == "batchnorm":
                h = torch.nn.functional.batch_norm(h, None, None, tensors[f"{name}.gamma"],
                                                   tensors[f"{name}.beta"], training=True,
                                                   eps=EPS)
            elif kind == "relu":
                h = torch.relu(h)
            elif kind == "maxpool2d":
                h = torch.nn.functional.max_pool2d(h, 2)
            elif kind == "flatten":
                h = h.flatten(1)
            else:
                h = h @ tensors[f"{name}.W"] + tensors[f"{name}.b"]
        loss = torch.nn.functional.cross_entropy(h, ty)
        loss.backward()
        return loss.item(), {k: t.grad for k, t in tensors.items()}

    return run, torch


# --------------------------------------------------------------------------- benchmark


def problem(net: str, dtype, batch: int | None = None, shape=None, seed: int = 0):
    """The generated module, parameters, a batch and labels."""
    from symbp.checking.gradcheck import load_module
    from symbp.declare.spec import parse_spec
    from symbp.emit.module import generate_module

    shape = shape or SHAPES[net][0]
    batch = batch or SHAPES[net][1]
    spec = parse_spec(spec_text(net, shape))
    module = load_module(generate_module(spec))
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(dtype)
              for k, v in module.init_params(seed=seed, dtype=dtype).items()}
    x = rng.standard_normal((batch, *shape)).astype(dtype)
    y = rng.integers(0, 10, size=batch)
    return module, params, x, y


def run(net: str, dtype, repeats: int, threads: int, quick: bool,
        helper_threads: bool = False) -> dict:
    batch = 8 if quick else None
    module, params, x, y = problem(net, dtype, batch=batch)
    if helper_threads and hasattr(module, "set_threads"):
        module.set_threads(threads)

    def generated():
        return module.loss_and_grads(params, x, y, wrt_input=False)

    def handwritten():
        return handwritten_loss_and_grads(net, params, x, y)

    # The two implementations agree (in float64, on a small batch) before they race.
    module64, params64, x64, y64 = problem(net, np.float64, batch=4)
    loss, grads = module64.loss_and_grads(params64, x64, y64, wrt_input=False)
    ref_loss, ref = handwritten_loss_and_grads(net, params64, x64, y64)
    tolerance = 1e-9
    assert abs(loss - ref_loss) <= tolerance * abs(ref_loss), (loss, ref_loss)
    largest = max(float(np.max(np.abs(value))) for value in ref.values())
    for name, value in ref.items():
        scale = max(float(np.max(np.abs(value))), 1e-2 * largest)
        assert float(np.max(np.abs(grads[name] - value))) <= tolerance * scale, name

    with blas_threads(threads):
        times = time_alternating({"generated": generated, "handwritten": handwritten},
                                 repeats=repeats, warmup=1)
        torch_run = torch_loss_and_grads_factory(net, params, x, y)
        if torch_run is not None:
            # Interleaved with NumPy, PyTorch's pass slowed down (LeNet: 21 ms instead of 14),
            # and next to the hand-written pass the generated one did (page faults): so the
            # generated pass and PyTorch's are timed alone, in alternating blocks of 3 calls,
            # and their ratio is taken block by block: the machine's drift (±30% from minute
            # to minute here) cancels, where two phases one after the other carried it.
            closure, torch = torch_run
            torch.set_num_threads(threads)
            blocks = time_in_blocks({"generated": generated, "pytorch": closure},
                                    blocks=max(repeats, 3), per_block=3)
            times["generated_alone"] = statistics.median(blocks["generated"])
            times["pytorch"] = statistics.median(blocks["pytorch"])
            times["gen/torch"] = median_ratio(blocks["generated"], blocks["pytorch"])
    return times


def against(rev: str, nets: list[str], dtypes: list[str], repeats: int, quick: bool) -> int:
    """This checkout's generated modules against those git revision ``rev`` generates from the
    same spec text (benchmarks/against.py), one thread, interleaved call by call."""
    import tempfile

    import against as vs

    with tempfile.TemporaryDirectory(prefix="symbp-old-modules-") as folder:
        old = vs.old_modules(rev, {net: spec_text(net) for net in nets}, Path(folder))
        print(blas_description())
        print(vs.header(rev))
        for net in nets:
            for name in dtypes:
                module, params, x, y = problem(net, np.dtype(name).type, batch=8 if quick else None)
                for each in (module, old[net]):
                    if hasattr(each, "set_threads"):
                        each.set_threads(1)
                difference = vs.largest_difference(
                    module.loss_and_grads(params, x, y, wrt_input=False),
                    old[net].loss_and_grads(params, x, y, wrt_input=False))
                with blas_threads(1):
                    result = vs.race(
                        lambda m=module, p=params, x=x, y=y: m.loss_and_grads(p, x, y,
                                                                              wrt_input=False),
                        lambda m=old[net], p=params, x=x, y=y: m.loss_and_grads(p, x, y,
                                                                                wrt_input=False),
                        repeats=repeats)
                print(vs.row(net, name, result, difference), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="1,2", help="BLAS thread counts (default 1,2)")
    parser.add_argument("--nets", default="lenet,wide")
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 repeats (a smoke test)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run in a child process with reference_mlp.KEEP_FREED_MEMORY_ENV "
                        "(glibc keeps freed memory, so fresh arrays do not page-fault)")
    parser.add_argument("--helper-threads", action="store_true",
                        help="the generated helpers get as many threads as BLAS (rerun in a "
                        f"child process with {HELPER_THREADS_ENV})")
    parser.add_argument("--against", metavar="REV",
                        help="time the generated modules against those git revision REV "
                        "generates, one thread, interleaved (benchmarks/against.py)")
    add_native_blas_argument(parser)
    args = parser.parse_args(argv)
    rerun = rerun_with_native_blas(__file__, argv, args.native_blas)
    if rerun is not None:
        return rerun
    if args.keep_freed_memory:
        return rerun_keeping_freed_memory(__file__, argv)
    if args.helper_threads and not HELPER_THREADS_ENV.items() <= os.environ.items():
        return rerun_with_env(__file__, argv, HELPER_THREADS_ENV)
    if args.against:
        return against(args.against, args.nets.split(","), ["float32", "float64"],
                       3 if args.quick else 3 * args.repeats, args.quick)
    dtype = np.dtype(args.dtype).type
    repeats = 2 if args.quick else args.repeats
    print(blas_description())
    if args.helper_threads:
        print(f"generated helpers: as many threads as BLAS ({HELPER_THREADS_ENV})")
    print(f"{'net':<7}{'threads':>8}{'generated':>12}{'hand-written':>14}{'gen/hand':>10}"
          f"{'generated':>12}{'pytorch':>10}{'gen/torch':>11}")
    for net in args.nets.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            times = run(net, dtype, repeats, threads, args.quick, args.helper_threads)
            line = (f"{net:<7}{threads:>8}{times['generated'] * 1e3:10.1f}ms"
                    f"{times['handwritten'] * 1e3:12.1f}ms"
                    f"{times['generated'] / times['handwritten']:10.2f}")
            if "pytorch" in times:
                line += (f"{times['generated_alone'] * 1e3:10.1f}ms"
                         f"{times['pytorch'] * 1e3:8.1f}ms"
                         f"{times['gen/torch']:11.2f}")
            print(line, flush=True)
        # What backward keeps (benchmarks/memory_kept.py): the generated cache, PyTorch's
        # saved tensors and the minimum, one training step at the benchmark's batch.
        from symbp.declare.spec import parse_spec

        batch = 8 if args.quick else SHAPES[net][1]
        row = memory_kept.measure(parse_spec(spec_text(net)), batch, dtype)
        print(memory_kept.line(f"{net} {args.dtype} batch={batch}", row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
