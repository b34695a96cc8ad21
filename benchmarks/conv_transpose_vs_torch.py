"""conv_transpose2d's generated forward+backward against PyTorch's ``F.conv_transpose2d``.

One layer, the decoder step of a conv autoencoder or a DCGAN generator: a batch of 32 images of
64 channels, 16x16, to 32 channels, 32x32 (kernel 4, stride 2, padding 1). The generated
module's ``<stem>_forward`` and ``<stem>_backward`` (dx, dW, db) against PyTorch's forward and
``autograd.grad`` of the same three, with one BLAS thread and one PyTorch thread, in float32
and float64. For reference, the same in the other direction: the mirrored conv2d (32x32x32 ->
64x16x16, the same kernel) against ``F.conv2d``, in the same run.

The two are first checked to agree (float64, to 1e-10 relative); then they are timed in
alternating blocks of 3 calls and the ratio is the median of the block-by-block ratios
(``reference_mlp.time_in_blocks``; see ``conv_vs_numpy.py`` for why).

    python benchmarks/conv_transpose_vs_torch.py [--repeats 7] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from reference_mlp import blas_description, blas_threads, median_ratio, time_in_blocks  # noqa: E402

import symbp  # noqa: E402
from symbp.checking.gradcheck import load_module  # noqa: E402
from symbp.declare.net import Net  # noqa: E402
from symbp.emit.module import generate_module  # noqa: E402


def layer_functions(layer, in_shape):
    """The generated forward and backward of ``layer`` and the keywords they take."""
    net = Net([layer], input_shape=in_shape, loss="mse")
    module = load_module(generate_module(net))
    stem = layer.stem_for(in_shape)
    out_shape = net.output_shape
    forward_keywords = dict(layer.constant_values())
    if layer.kind == "conv_transpose2d":
        forward_keywords.update(H_out=out_shape[1], W_out=out_shape[2])
    backward_keywords = {k: v for k, v in layer.constant_values().items()
                         if k in ("stride", "padding", "dilation")}
    forward, backward = getattr(module, f"{stem}_forward"), getattr(module, f"{stem}_backward")

    def run(x, W, b, dy):
        y, cache = forward(x, W, b, **forward_keywords)
        return (y, *backward(dy, *cache, W, **backward_keywords))

    return run, net


def torch_pass(kind, torch, x, W, b, dy, **kw):
    tF = torch.nn.functional
    x, W, b = (t.detach().requires_grad_(True) for t in (x, W, b))
    y = (tF.conv_transpose2d if kind == "conv_transpose2d" else tF.conv2d)(x, W, b, **kw)
    return (y, *torch.autograd.grad(y, (x, W, b), dy))


def case(kind, layer, in_shape, batch, dtype, repeats, torch, kw):
    run, net = layer_functions(layer, in_shape)
    rng = np.random.default_rng(0)
    shapes = net.param_shapes
    W = rng.standard_normal(shapes[f"{net.placed[0].name}.W"]) * 0.1
    b = rng.standard_normal(shapes[f"{net.placed[0].name}.b"])
    x = rng.standard_normal((batch, *in_shape))
    dy = rng.standard_normal((batch, *net.output_shape))
    # agreement, float64
    mine = run(x, W, b, dy)
    theirs = torch_pass(kind, torch, *(torch.tensor(a) for a in (x, W, b, dy)), **kw)
    for a, t in zip(mine, theirs, strict=True):
        t = t.detach().numpy()
        assert a.shape == t.shape and np.max(np.abs(a - t)) <= 1e-10 * np.max(np.abs(t))
    arrays = [a.astype(dtype) for a in (x, W, b, dy)]
    tensors = [torch.tensor(a) for a in arrays]
    blocks = time_in_blocks({"generated": lambda: run(*arrays),
                             "pytorch": lambda: torch_pass(kind, torch, *tensors, **kw)},
                            blocks=repeats, per_block=3)
    cpu = time.process_time()
    for _ in range(3):
        run(*arrays)
    cpu_generated = (time.process_time() - cpu) / 3
    cpu = time.process_time()
    for _ in range(3):
        torch_pass(kind, torch, *tensors, **kw)
    cpu_torch = (time.process_time() - cpu) / 3
    return (statistics.median(blocks["generated"]), statistics.median(blocks["pytorch"]),
            median_ratio(blocks["generated"], blocks["pytorch"]), cpu_generated / cpu_torch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="blocks of 3 calls (default 7)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(blas_description() + "; 1 BLAS thread, 1 PyTorch thread")
    print(f"{'layer':<52}{'dtype':>8}{'generated':>12}{'pytorch':>10}{'ratio':>7}"
          f"{'cpu ratio':>10}")
    rows = [
        ("conv_transpose2d", symbp.conv_transpose2d(32, 4, stride=2, padding=1), (64, 16, 16),
         dict(stride=2, padding=1), "conv_transpose2d 64x16x16 -> 32x32x32, k4 s2 p1"),
        ("conv2d", symbp.conv2d(64, 4, stride=2, padding=1), (32, 32, 32),
         dict(stride=2, padding=1), "conv2d (mirror) 32x32x32 -> 64x16x16, k4 s2 p1"),
    ]
    with blas_threads(1):
        for dtype in (np.float32, np.float64):
            for kind, layer, shape, kw, label in rows:
                gen, ref, ratio, cpu_ratio = case(kind, layer, shape, args.batch, dtype,
                                                  args.repeats, torch, kw)
                print(f"{label:<52}{np.dtype(dtype).name:>8}{gen * 1e3:10.1f}ms"
                      f"{ref * 1e3:8.1f}ms{ratio:7.2f}{cpu_ratio:10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
