"""How the cost of deriving backpropagation grows with depth.

MLPs of 8, 16, 32 and 64 blocks, each block ``linear -> batchnorm -> activation``, the
activation cycling through sigmoid, tanh, relu and a user expression (mish), softmax
cross-entropy on top. For each depth, from a cleared cache (symbp's per-layer-type cache and
sympy's own), it times:

* ``derive``: :func:`symbp.derivation.network.derive_network` -- every layer type derived once, then
  one chain-rule step per layer;
* ``+ arrays``: the same, plus the whole-array form of every layer's forward stages and backward
  formulas (:class:`~symbp.derivation.arrays.Lowering` and
  :func:`~symbp.emit.numpy_printer.numpy_code`), done per layer, as code generation does.

The goal (issue 2): linear growth, ratio 64/8 at most 10, and under 2 s for 64 blocks.
Each figure is the median of ``--repeats`` runs, as wall-clock time and as this process's CPU
time (on a shared machine other people's jobs inflate the wall clock, not the CPU time). For
comparison, ``warm``: ``derive_network`` again with the per-layer-type cache kept, as a second
derivation in the same process sees it. Run: ``python benchmarks/derive_depth.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import sympy.core.cache

from symbp.declare import layers
from symbp.declare.net import Net
from symbp.derivation.arrays import Lowering
from symbp.derivation.network import NetworkDerivation, clear_cache, derive_network
from symbp.emit.numpy_printer import numpy_code

MISH = "x*tanh(log(1 + exp(x)))"
DEPTHS = (8, 16, 32, 64)
WIDTH = 64


def activation(block: int) -> layers.Layer:
    """The block's activation: sigmoid, tanh, relu, mish, sigmoid, ..."""
    choices = (layers.Sigmoid, layers.Tanh, layers.Relu, lambda: layers.Activation(MISH))
    return choices[block % len(choices)]()


def mlp(blocks: int, width: int = WIDTH) -> Net:
    stack: list[layers.Layer] = []
    for block in range(blocks):
        stack += [layers.Linear(width), layers.BatchNorm(), activation(block)]
    stack.append(layers.Linear(10, name="out"))
    return Net(stack, input_features=width, loss="softmax_cross_entropy", name=f"mlp{blocks}")


def whole_array_forms(derivation: NetworkDerivation) -> int:
    """Lower and print every layer's forward stages and backward formulas; count them."""
    count = 0
    derived = [item.derivation for item in derivation.layers]
    if derivation.loss is not None:
        derived.append(derivation.loss)
    for layer in derived:
        names = set(layer.form.arrays) | {layer.upstream.name}
        formulas = [(s.expr, s.indices) for s in layer.form.stages]
        formulas += [(a.expr, a.indices) for a in layer.vjp.values()]
        for expr, indices in formulas:
            numpy_code(Lowering(names, layer.form).lower(expr, indices))
            count += 1
    return count


def cold() -> None:
    clear_cache()
    sympy.core.cache.clear_cache()


def time_once(net: Net, arrays: bool, warm: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds to derive ``net`` (and lower every formula if ``arrays``)."""
    if not warm:
        cold()
    start, start_cpu = time.perf_counter(), time.process_time()
    derivation = derive_network(net)
    if arrays:
        whole_array_forms(derivation)
    return time.perf_counter() - start, time.process_time() - start_cpu


def median_of(repeats: int, run) -> tuple[float, float]:
    """Median wall and median CPU time of ``repeats`` runs."""
    runs = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    time_once(mlp(1), arrays=True)  # imports and first-call set-up, not measured
    print(f"blocks of linear({WIDTH}) + batchnorm + activation (sigmoid/tanh/relu/mish), "
          f"median of {args.repeats}; seconds, wall / CPU; cold: caches cleared first")
    print(f"{'blocks':>6} {'layers':>6} {'formulas':>8}  {'derive, cold':>13}  "
          f"{'+ arrays, cold':>14}  {'derive, warm':>13}")
    results = {}
    for depth in args.depths:
        net = mlp(depth)
        derive = median_of(args.repeats, lambda net=net: time_once(net, False))
        total = median_of(args.repeats, lambda net=net: time_once(net, True))
        warm = median_of(args.repeats, lambda net=net: time_once(net, False, warm=True))
        formulas = whole_array_forms(derive_network(net))
        results[depth] = (derive, total)
        print(f"{depth:>6} {len(list(net.walk())):>6} {formulas:>8}  "
              + "  ".join(f"{w:>6.3f}/{c:<6.3f}" for w, c in (derive, total, warm)))
    low, high = min(results), max(results)
    if low != high:
        for clock, which in (("wall", 0), ("CPU", 1)):
            derive_ratio = results[high][0][which] / results[low][0][which]
            total_ratio = results[high][1][which] / results[low][1][which]
            print(f"ratio {high}/{low} ({clock}): derive {derive_ratio:.2f}, with whole-array "
                  f"forms {total_ratio:.2f} (depth ratio {high / low:.0f}; goal <= 10)")


if __name__ == "__main__":
    main()
