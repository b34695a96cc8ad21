"""Timing a generated module's training step against PyTorch's, shared by the benchmarks.

``time_blocks`` runs the sides in alternating blocks of ``PER_BLOCK`` steps (CPU time, after one
untimed step each); ``compare`` prints the medians over the blocks and the median of the
block-by-block ratios against a goal; ``profile`` prints cProfile's view of the generated step.
The calling script sets the BLAS/OpenMP thread variables before NumPy loads.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

PER_BLOCK = 2  # steps of one side in a row (after one untimed step)


def sgd_steps(module, params, x, y, tparams, loss_of, lr: float) -> dict:
    """``{"generated": step, "pytorch": step}``: one SGD step each (loss, every gradient, the
    update in place), returning ``(loss, grads)``; PyTorch's on ``tparams`` and ``loss_of``."""
    import torch

    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def generated():
        loss, grads = module.loss_and_grads(params, x, y, wrt_input=False)
        for name, value in params.items():
            value -= lr * grads[name]
        return loss, grads

    def pytorch():
        for p in tparams.values():
            p.grad = None
        loss = loss_of(tx, ty)
        loss.backward()
        with torch.no_grad():
            for p in tparams.values():
                p -= lr * p.grad
        return loss, {k: p.grad for k, p in tparams.items()}

    return {"generated": generated, "pytorch": pytorch}


def time_blocks(sides, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    for step in sides.values():
        step()  # untimed: first-call costs
    for _ in range(max(1, repeats // PER_BLOCK)):
        for name, step in sides.items():
            start = time.process_time()
            for _ in range(PER_BLOCK):
                step()
            times[name].append((time.process_time() - start) / PER_BLOCK)
    return times


def profile(generated, calls: int) -> None:
    """cProfile of the generated step: the functions by their own time."""
    import cProfile
    import pstats

    generated()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [generated() for _ in range(calls)])
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def compare(title: str, steps, repeats: int, batch: int, goal: float) -> float:
    """Print one row per dtype (generated, PyTorch, ratio) and the goal's verdict; the worst
    ratio. ``steps(dtype, batch)`` gives ``{"generated": step, "pytorch": step}``."""
    print(f"{title}, batch {batch}, 1 thread, CPU ms per step (medians over blocks)")
    print(f"{'dtype':<8} {'generated':>10} {'pytorch':>10} {'ratio':>6}")
    worst = 0.0
    for dtype in (np.float32, np.float64):
        times = time_blocks(steps(dtype, batch), repeats)
        ratio = statistics.median(
            g / t for g, t in zip(times["generated"], times["pytorch"], strict=True))
        worst = max(worst, ratio)
        print(f"{np.dtype(dtype).name:<8} {1e3 * statistics.median(times['generated']):>10.1f} "
              f"{1e3 * statistics.median(times['pytorch']):>10.1f} {ratio:>6.2f}")
    print(f"goal: generated <= {goal}x PyTorch: {'met' if worst <= goal else 'NOT met'} "
          f"(worst ratio {worst:.2f})")
    return worst
