"""An LSTM's training step: the generated NumPy module vs ``nn.LSTM`` in PyTorch eager.

The network (issue 25, *Speed*): ``lstm(hidden = 256)`` on sequences ``(T, D) = (64, 256)``,
its last hidden state into ``linear(10)`` and ``softmax_cross_entropy``; batch 64. One training
step is the loss, every gradient (``loss_and_grads``, ``wrt_input=False``) and a plain SGD
update in place. PyTorch's side is ``nn.LSTM(D, H, batch_first=True)`` with the same
parameters (symbp's ``lstm.W_ih``, ... are PyTorch's ``weight_ih_l0``, ... : same names' order,
shapes and gate order), the head ``h @ W + b`` on the same arrays and ``F.cross_entropy``;
``loss.backward()`` then ``p -= lr * p.grad`` under ``no_grad``.

Before timing, both sides' loss and gradients must agree in float64 to 1e-8 (relative to each
array's largest value). The sides are timed in alternating blocks of two steps (CPU
time, one thread: the BLAS and OpenMP variables are set before NumPy and PyTorch load, and
``torch.set_num_threads(1)``); the printed times are medians over the blocks, the ratio the
median of the block-by-block ratios. The goal (issue 25): generated <= 1.5x PyTorch.

    python benchmarks/lstm_vs_torch.py [--repeats 8] [--batch 64] [--profile]
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

T, D, H, BATCH, CLASSES = 64, 256, 256, 64, 10
GOAL = 1.5
LR = 1e-2
TORCH_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0",
               "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}


def spec(length: int = T, width: int = D, hidden: int = H) -> str:
    return f"""
input = {{ shape = [{length}, {width}] }}
loss = "softmax_cross_entropy"
layers = [
  {{ type = "lstm", name = "lstm", hidden = {hidden} }},
  {{ type = "linear", name = "out", out = {CLASSES} }},
]
"""


def inputs(dtype, batch: int, seed: int = 0, length: int = T, width: int = D, hidden: int = H):
    net = symbp.parse_spec(spec(length, width, hidden))
    module = load_module(symbp.codegen(net), "symbp_lstm_classifier")
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(hidden)  # PyTorch's initialisation of nn.LSTM
    params = module.init_params(seed=seed, dtype=dtype)
    params = {k: (rng.uniform(-bound, bound, v.shape) if k.startswith("lstm.") else
                  v + 0.05 * rng.standard_normal(v.shape)).astype(dtype)
              for k, v in params.items()}
    x = rng.standard_normal((batch, length, width)).astype(dtype)
    y = rng.integers(0, CLASSES, batch)
    return module, params, x, y


def torch_net(params: dict):
    """The torch parameters (copies of symbp's) and the network's loss function."""
    import torch
    import torch.nn.functional as F

    width, hidden = params["lstm.W_ih"].shape[1], params["lstm.W_hh"].shape[1]
    dtype = torch.from_numpy(params["lstm.W_ih"]).dtype
    lstm = torch.nn.LSTM(width, hidden, batch_first=True).to(dtype)
    with torch.no_grad():
        for name, torch_name in TORCH_NAMES.items():
            getattr(lstm, torch_name).copy_(torch.from_numpy(params[f"lstm.{name}"]))
    head = {k: torch.from_numpy(params[f"out.{k}"].copy()).requires_grad_() for k in "Wb"}
    tparams = {**{f"lstm.{n}": getattr(lstm, t) for n, t in TORCH_NAMES.items()},
               **{f"out.{k}": v for k, v in head.items()}}

    def loss_of(x, labels):
        _, (h_n, _) = lstm(x)
        return F.cross_entropy(h_n[0] @ head["W"] + head["b"], labels)

    return tparams, loss_of


def steps(dtype, batch: int):
    """``{name: step}``: one SGD step each, returning ``(loss, grads)``."""
    import torch

    torch.set_num_threads(1)
    module, params, x, y = inputs(dtype, batch)
    tparams, loss_of = torch_net(params)
    return step_timing.sgd_steps(module, params, x, y, tparams, loss_of, LR)


def check(batch: int = 4, length: int = 8, width: int = 16, hidden: int = 12) -> float:
    """The largest relative difference of loss and gradients, float64, small sizes."""
    import torch

    module, params, x, y = inputs(np.float64, batch, 3, length, width, hidden)
    tparams, loss_of = torch_net(params)
    loss = loss_of(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    mine, grads = module.loss_and_grads(params, x, y, wrt_input=False)
    worst = abs(float(mine) - loss.item()) / abs(loss.item())
    for name, p in tparams.items():
        theirs = p.grad.numpy()
        worst = max(worst, float(np.abs(grads[name] - theirs).max() / np.abs(theirs).max()))
    if worst > 1e-8:
        raise AssertionError(f"the generated LSTM disagrees with PyTorch's: {worst:.3g}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per side")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--profile", action="store_true",
                        help="profile the generated step (float32, then float64) instead")
    args = parser.parse_args(argv)
    if args.profile:
        for dtype in (np.float32, np.float64):
            step_timing.profile(steps(dtype, args.batch)["generated"], calls=2)
        return 0
    print(f"agreement with PyTorch, float64: {check():.2e} (relative, loss and gradients)")
    step_timing.compare(f"LSTM training step, T={T}, D={D}, H={H}", steps, args.repeats,
                        args.batch, GOAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
