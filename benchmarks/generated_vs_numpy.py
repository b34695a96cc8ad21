"""Generated module vs careful hand-written numpy vs the GEMMs alone vs PyTorch eager (CPU).

The network is the reference MLP of ``benchmarks/reference_mlp.py``::

    x (784) -> [Linear 1024 -> BatchNorm1d (train) -> ReLU] x 3 -> Linear 10
            -> softmax cross-entropy (integer labels, mean over the batch)

The generated side is ``symbp.emit.module.generate_module(net)`` for the same network declared
as a :class:`symbp.Net`, loaded with :func:`symbp.checking.gradcheck.load_module` and run through
its ``loss_and_grads(params, x, y, wrt_input=False, reuse=previous)`` (the hand-written pass
does not compute the input's gradient either, and it overwrites the gradient arrays it
returned the call before; ``reuse`` does the same).  ``generated_fresh`` is the same call
without ``reuse`` (new gradient arrays every call).  Both sides get the very same parameter
dict (the generated module names its parameters ``fc1.W, ..., bn1.gamma, ..., out.b`` like
the reference) and must agree on the loss and every gradient before anything is timed.

Per dtype (float32, float64) and BLAS thread count (1, 2; set with ``threadpoolctl``), in one
process: generated, hand-written and the 11 GEMMs alone are timed round-robin (median of
``--repeats``); PyTorch eager and torch's GEMMs alone are timed as a second round-robin group
(interleaving the two thread pools makes them fight, see ``reference_mlp``).  Printed: the
median times and the ratios generated/hand-written, generated/GEMM-only and generated/torch,
against the goals of issue 3 (<= 1.0, <= 1.10, <= 1.0).

Run ``python benchmarks/generated_vs_numpy.py --help``.  The machine is noisy when shared:
compare ratios from one run, and run it twice.  The median CPU time of the process is printed
next to the wall time (more robust with one BLAS thread when other jobs share the cores).
The generated module, like torch, returns new arrays on every call; with glibc's default
settings their pages are returned to the kernel and fault in again on the next call (several
thousand page faults, ~10 ms of system time per call here), which the hand-written pass avoids
by reusing its buffers: ``--keep-freed-memory`` measures without that effect.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

import symbp
from symbp.checking.gradcheck import load_module
from symbp.emit.module import generate_module

GOALS = {"handwritten": 1.0, "gemm_only": 1.10, "torch": 1.0}


sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import memory_kept  # noqa: E402
import reference_mlp as ref  # noqa: E402


def reference_net(widths: tuple[int, ...] = ref.DEFAULT_WIDTHS) -> symbp.Net:
    """The benchmark network as a symbp declaration (parameter names as in the reference)."""
    layers = []
    for i, width in enumerate(widths[1:-1], start=1):
        layers += [
            symbp.linear(width, name=f"fc{i}"),
            symbp.batchnorm(name=f"bn{i}", eps=ref.BN_EPS),
            symbp.relu(name=f"relu{i}"),
        ]
    layers.append(symbp.linear(widths[-1], name="out"))
    return symbp.Net(layers, input_features=widths[0], loss="softmax_cross_entropy")


def generated_module(widths: tuple[int, ...] = ref.DEFAULT_WIDTHS):
    """The generated module for :func:`reference_net` (source and loaded module)."""
    source = generate_module(reference_net(widths))
    return source, load_module(source, "symbp_generated_mlp")


def reference_spec_text(widths: tuple[int, ...] = ref.DEFAULT_WIDTHS) -> str:
    """:func:`reference_net` as TOML spec text (what another revision's symbp reads)."""
    lines = ['name = "mlp"', f"input = {{ features = {widths[0]} }}",
             'loss = "softmax_cross_entropy"']
    for i, width in enumerate(widths[1:-1], start=1):
        lines += ["[[layers]]", 'type = "linear"', f'name = "fc{i}"', f"out = {width}",
                  "[[layers]]", 'type = "batchnorm"', f'name = "bn{i}"', f"eps = {ref.BN_EPS!r}",
                  "[[layers]]", 'type = "relu"', f'name = "relu{i}"']
    lines += ["[[layers]]", 'type = "linear"', 'name = "out"', f"out = {widths[-1]}"]
    return "\n".join(lines) + "\n"


def against(rev: str, dtypes: list[str], batch: int, repeats: int) -> int:
    """This checkout's generated module against the one ``rev`` generates (benchmarks/against.py):
    both agree with the hand-written pass, then race with one BLAS thread."""
    import tempfile

    import against as vs

    _, new = generated_module()
    with tempfile.TemporaryDirectory(prefix="symbp-old-modules-") as folder:
        old = vs.old_modules(rev, {"mlp": reference_spec_text()}, Path(folder))["mlp"]
        print(ref.blas_description())
        print(vs.header(rev))
        for name in dtypes:
            dtype = np.dtype(name)
            params = ref.make_params(0, dtype)
            x, y = ref.make_batch(0, dtype, batch)
            check_agreement(new, params, x, y)
            check_agreement(old, params, x, y)
            difference = vs.largest_difference(
                new.loss_and_grads(params, x, y, wrt_input=False),
                old.loss_and_grads(params, x, y, wrt_input=False),
            )
            previous = {
                "new": new.loss_and_grads(params, x, y, wrt_input=False)[1],
                "old": old.loss_and_grads(params, x, y, wrt_input=False)[1],
            }

            def step(key, module, previous=previous, params=params, x=x, y=y):
                # overwrites the previous call's gradients, as the main benchmark's does
                previous[key] = module.loss_and_grads(
                    params, x, y, wrt_input=False, reuse=previous[key])[1]

            with ref.blas_threads(1):
                result = vs.race(lambda: step("new", new), lambda: step("old", old),
                                 repeats=repeats)
            print(vs.row("mlp", dtype.name, result, difference), flush=True)
    return 0


def check_agreement(module, params, x, y) -> float:
    """Largest relative difference between the generated and hand-written loss/gradients
    (raises if it is above what the dtype's rounding explains)."""
    loss_h, grads_h = ref.handwritten_loss_and_grads(params, x, y)
    _, reused = module.loss_and_grads(params, x, y, wrt_input=False)
    reused = {name: np.full_like(g, np.nan) for name, g in reused.items()}
    loss_g, grads_g = module.loss_and_grads(params, x, y, wrt_input=False, reuse=reused)
    tol = 1e-4 if x.dtype == np.float32 else 1e-10
    worst = abs(float(loss_g) - loss_h) / max(1.0, abs(loss_h))
    # The linear biases before a batch norm have a gradient that is 0 in exact arithmetic
    # (rounding noise on both sides): every tensor is compared on the scale of the largest
    # gradient of the network.
    scale = max(float(np.abs(g).max()) for g in grads_h.values())
    for name, g in grads_h.items():
        got = grads_g[name]
        if got.dtype != x.dtype or got.shape != g.shape:
            raise AssertionError(f"{name}: {got.dtype}{got.shape} vs {g.dtype}{g.shape}")
        worst = max(worst, float(np.abs(got - g).max()) / scale)
    if worst > tol:
        raise AssertionError(f"generated and hand-written disagree: {worst:.3g} > {tol}")
    return worst


def benchmark(
    module,
    dtype,
    threads: int,
    batch: int = 256,
    repeats: int = 20,
    warmup: int = 3,
    include_torch: bool = True,
) -> dict:
    """Median times at one dtype and thread count, and the ratios."""
    params = ref.make_params(0, dtype)
    x, y = ref.make_batch(0, dtype, batch)
    agreement = check_agreement(module, params, x, y)
    ws = ref.MLPWorkspace.for_inputs(params, x)
    ops = ref.make_gemm_operands(params, x)
    previous: dict[str, dict] = {"grads": module.loss_and_grads(params, x, y, wrt_input=False)[1]}

    def generated():  # overwrites the previous call's gradients, as the hand-written pass does
        previous["grads"] = module.loss_and_grads(
            params, x, y, wrt_input=False, reuse=previous["grads"]
        )[1]

    fns: dict[str, Callable[[], object]] = {
        "generated": generated,
        "generated_fresh": lambda: module.loss_and_grads(params, x, y, wrt_input=False),
        "handwritten": lambda: ref.handwritten_loss_and_grads(params, x, y, ws),
        "gemm_only": lambda: ref.gemm_only(params, x, ops),
    }
    with ref.blas_threads(threads):
        times, cpu = ref.time_alternating_with_cpu(fns, repeats=repeats, warmup=warmup)
    step = ref.torch_loss_and_grads(params, x, y, threads) if include_torch else None
    if step is not None:
        torch_fns = {"torch": step, "torch_gemm_only": ref.torch_gemm_only(params, x, threads)}
        with ref.blas_threads(threads):
            more, more_cpu = ref.time_alternating_with_cpu(
                torch_fns, repeats=repeats, warmup=warmup
            )
        times.update(more)
        cpu.update(more_cpu)
    others = [o for o in ("handwritten", "gemm_only", "torch", "generated_fresh") if o in times]
    return {
        "dtype": np.dtype(dtype).name,
        "threads": threads,
        "batch": batch,
        "agreement": agreement,
        "times_s": times,
        "cpu_times_s": cpu,
        "ratios": {o: times["generated"] / times[o] for o in others},
        "cpu_ratios": {o: cpu["generated"] / cpu[o] for o in others},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ref.common_arguments(parser, repeats=20, warmup=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--show-source", action="store_true", help="print the generated module")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run in a child process with reference_mlp.KEEP_FREED_MEMORY_ENV (glibc keeps "
        "freed memory, so fresh arrays do not page-fault; the hand-written pass reuses its "
        "buffers and never does)",
    )
    parser.add_argument(
        "--against", metavar="REV",
        help="time this checkout's generated module against the one git revision REV "
        "generates, one thread, interleaved (benchmarks/against.py)",
    )
    ref.add_native_blas_argument(parser)
    args = parser.parse_args(argv)
    rerun = ref.rerun_with_native_blas(__file__, argv, args.native_blas)
    if rerun is not None:
        return rerun
    if args.keep_freed_memory:
        return ref.rerun_keeping_freed_memory(__file__, argv)

    if args.against:
        return against(args.against, args.dtypes, args.batch, args.repeats)
    source, module = generated_module()
    if args.show_source:
        print(source)
        return 0
    results = [
        benchmark(
            module,
            np.dtype(dtype),
            threads,
            args.batch,
            args.repeats,
            args.warmup,
            include_torch=not args.no_torch,
        )
        for threads in args.threads
        for dtype in args.dtypes
    ]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(ref.blas_description())
    for r in results:
        t, ratios = r["times_s"], r["ratios"]
        line = (
            f"{r['dtype']:>8} threads={r['threads']} batch={r['batch']}: "
            f"generated {t['generated'] * 1e3:7.2f} ms (fresh arrays "
            f"{t['generated_fresh'] * 1e3:7.2f} ms)  handwritten {t['handwritten'] * 1e3:7.2f}"
            f" ms  gemm_only {t['gemm_only'] * 1e3:7.2f} ms"
        )
        if "torch" in t:
            line += f"  torch {t['torch'] * 1e3:7.2f} ms"
        print(line)
        marks = []
        for other, ratio in ratios.items():
            if other not in GOALS:
                continue
            verdict = "ok" if ratio <= GOALS[other] else "MISSED"
            marks.append(f"generated/{other} {ratio:.3f} (goal <= {GOALS[other]:.2f}: {verdict})")
        print("    wall: " + "  ".join(marks))
        cpu = "  ".join(
            f"generated/{o} {v:.3f}" for o, v in r["cpu_ratios"].items() if o in GOALS
        )
        fresh = ratios["generated_fresh"]
        print(f"    cpu:  {cpu}")
        print(f"    generated (reusing the last gradients) / generated (new arrays) {fresh:.3f}")
    # What backward keeps (benchmarks/memory_kept.py): the generated cache, PyTorch's saved
    # tensors and the minimum, one training step at the benchmark's batch.
    for dtype in args.dtypes:
        row = memory_kept.measure(reference_net(), args.batch, np.dtype(dtype).type)
        print(memory_kept.line(f"mlp {dtype} batch={args.batch}", row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
