"""A pre-norm transformer block's training step: the generated NumPy module vs PyTorch eager.

The block (issue 25, *Speed*): ``layer_norm -> attention (4 heads) -> residual``, then
``layer_norm -> linear(4D) -> gelu -> linear(D) -> residual``, and an ``mse`` loss against a
target of shape ``(T, D)``; T = 128, D = 256, batch 16. One training step is the loss, every
gradient (``loss_and_grads``, ``wrt_input=False``) and a plain SGD update in place. PyTorch's
side is the same block in eager mode, its parameters the very arrays of symbp's layout
(``Wq (D, heads, E)`` viewed as a ``(D, D)`` matrix, ...): ``F.layer_norm``, the projections
as matrix products, ``F.scaled_dot_product_attention``, ``F.gelu`` (erf form) and
``F.mse_loss``; ``loss.backward()`` then ``p -= lr * p.grad`` under ``no_grad``.

Before timing, both sides' loss and gradients must agree in float64 to 1e-8 (relative to each
array's largest value). The sides are timed in alternating blocks of two steps
(CPU time, one thread: the BLAS and OpenMP variables are set before NumPy and PyTorch load,
and ``torch.set_num_threads(1)``); the printed times are medians over the blocks, the ratio
the median of the block-by-block ratios. The goal (issue 25): generated <= 1.5x PyTorch.

    python benchmarks/transformer_vs_torch.py [--repeats 12] [--batch 16] [--profile]
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before NumPy (and PyTorch) load

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# this checkout's symbp (an editable install may point at another one, e.g. from a worktree)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import symbp  # noqa: E402
from symbp.checking.gradcheck import load_module  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_timing  # noqa: E402

T, D, HEADS, BATCH = 128, 256, 4, 16
GOAL = 1.5
LR = 1e-3


def block_net(length: int = T, width: int = D, heads: int = HEADS) -> symbp.Net:
    return symbp.Net([
        symbp.residual([symbp.layer_norm(name="ln1"), symbp.attention(heads=heads, name="mha")],
                       name="attn"),
        symbp.residual([symbp.layer_norm(name="ln2"), symbp.linear(4 * width, name="up"),
                        symbp.gelu(), symbp.linear(width, name="down")], name="mlp"),
    ], input_shape=(length, width), loss="mse")


def inputs(dtype, batch: int, seed: int = 0, length: int = T, width: int = D):
    module = load_module(symbp.codegen(block_net(length, width)), "symbp_transformer_block")
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=dtype)
    # nothing special: biases not zero, gammas not one
    params = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(dtype)
              for k, v in params.items()}
    x = rng.standard_normal((batch, length, width)).astype(dtype)
    y = rng.standard_normal((batch, length, width)).astype(dtype)
    return module, params, x, y


def torch_block(params: dict, heads: int = HEADS):
    """The torch parameters (sharing symbp's arrays) and the block's loss function."""
    import torch
    import torch.nn.functional as F

    tp = {k: torch.from_numpy(v).requires_grad_() for k, v in params.items()}
    width = tp["ln1.gamma"].shape[0]
    E = width // heads

    def loss_of(x, target):
        n, t, _ = x.shape
        h = F.layer_norm(x, (width,), tp["ln1.gamma"], tp["ln1.beta"], eps=1e-5)

        def project(name):
            W, b = tp[f"mha.W{name}"].reshape(width, width), tp[f"mha.b{name}"].reshape(width)
            return (h @ W + b).view(n, t, heads, E).transpose(1, 2)

        c = F.scaled_dot_product_attention(project("q"), project("k"), project("v"))
        c = c.transpose(1, 2).reshape(n, t, width)
        x = x + c @ tp["mha.Wo"].reshape(width, width) + tp["mha.bo"]
        h = F.layer_norm(x, (width,), tp["ln2.gamma"], tp["ln2.beta"], eps=1e-5)
        h = F.gelu(h @ tp["up.W"] + tp["up.b"])
        x = x + h @ tp["down.W"] + tp["down.b"]
        return F.mse_loss(x, target)

    return tp, loss_of


def steps(dtype, batch: int):
    """``{name: step}``: one SGD step each, returning ``(loss, grads)``."""
    import torch

    torch.set_num_threads(1)
    module, params, x, y = inputs(dtype, batch)
    tparams, loss_of = torch_block({k: v.copy() for k, v in params.items()})
    return step_timing.sgd_steps(module, params, x, y, tparams, loss_of, LR)


def check(batch: int = 4) -> float:
    """The largest relative difference of loss and gradients, float64, small batch."""
    import torch

    module, params, x, y = inputs(np.float64, batch, seed=3)
    tparams, loss_of = torch_block({k: v.copy() for k, v in params.items()})
    loss = loss_of(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    mine, grads = module.loss_and_grads(params, x, y, wrt_input=False)
    worst = abs(float(mine) - loss.item()) / abs(loss.item())
    # the key bias's gradient is 0 exactly (softmax ignores a shift of every logit): both sides
    # give rounding noise there, measured against the largest gradient of all
    floor = 1e-6 * max(float(p.grad.abs().max()) for p in tparams.values())
    for name, p in tparams.items():
        theirs = p.grad.numpy()
        scale = max(float(np.abs(theirs).max()), floor)
        worst = max(worst, float(np.abs(grads[name] - theirs).max()) / scale)
    if worst > 1e-8:
        raise AssertionError(f"the generated block disagrees with PyTorch's: {worst:.3g}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=12, help="timed steps per side")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--profile", action="store_true",
                        help="profile the generated step (float32, then float64) instead")
    args = parser.parse_args(argv)
    if args.profile:
        for dtype in (np.float32, np.float64):
            step_timing.profile(steps(dtype, args.batch)["generated"], calls=3)
        return 0
    print(f"agreement with PyTorch, float64: {check():.2e} (relative, loss and gradients)")
    step_timing.compare(f"transformer block training step, T={T}, D={D}, {HEADS} heads",
                        steps, args.repeats, args.batch, GOAL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
