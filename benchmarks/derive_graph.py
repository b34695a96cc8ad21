"""Deriving a graph net stays linear in its size: the time per node is about constant.

Graph nets of ``k`` parallel branches (k = 4, 8, 16, 32): the input ``x`` fans out to ``k``
branches, each ``linear -> activation`` (sigmoid, tanh, relu, mish in turn), the branches
joined by a chain of ``add`` layers, every other join followed by a ``concat`` with the input
and a ``linear`` back to the width (so the plan holds fan-out sums, adds and concats), then a
linear head and softmax cross-entropy. From cleared caches (as ``derive_depth.py``), it times
``derive_network`` and, ``+ module``, the whole generated module (derivation, whole-array
forms, printing), and prints the CPU time per node (layer).

    python benchmarks/derive_graph.py [--branches 4 8 16 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# this checkout's symbp (an editable install may point at another one, e.g. from a worktree)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from derive_depth import MISH, cold, median_of, time_once

import symbp
from symbp.declare.net import Net
from symbp.emit.module import generate_module

WIDTH = 16


def activation(branch: int, name: str):
    choices = (symbp.sigmoid, symbp.tanh, symbp.relu,
               lambda name: symbp.activation(MISH, name=name))
    return choices[branch % len(choices)](name=name)


def graph(branches: int, width: int = WIDTH) -> Net:
    stack = []
    for b in range(branches):
        stack += [symbp.linear(width, name=f"fc{b}").reads("x"), activation(b, f"act{b}")]
    joined = "act0"
    for b in range(1, branches):
        stack.append(symbp.add(name=f"sum{b}").reads(joined, f"act{b}"))
        joined = f"sum{b}"
        if b % 2 == 0:
            stack += [symbp.concat(name=f"cat{b}").reads(joined, "x"),
                      symbp.linear(width, name=f"mix{b}")]
            joined = f"mix{b}"
    stack.append(symbp.linear(10, name="head").reads(joined))
    return Net(stack, inputs={"x": (width,)}, loss="softmax_cross_entropy",
               name=f"branches{branches}")


def generate_once(net: Net) -> tuple[float, float]:
    """(wall, CPU) seconds to generate ``net``'s module from cleared caches."""
    cold()
    start, start_cpu = time.perf_counter(), time.process_time()
    generate_module(net)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    generate_once(graph(2))  # imports and first-call set-up, not measured
    print(f"k branches of linear({WIDTH}) + activation, joined by add / concat / linear; "
          f"median of {args.repeats}, cold; CPU seconds, and CPU ms per node")
    print(f"{'k':>4} {'nodes':>6} {'derive':>8} {'ms/node':>8} {'+ module':>9} {'ms/node':>8}")
    per_node, rows = [], []
    for k in args.branches:
        net = graph(k)
        nodes = len(list(net.walk()))
        derive = median_of(args.repeats, lambda net=net: time_once(net, False))[1]
        total = median_of(args.repeats, lambda net=net: generate_once(net))[1]
        per_node.append(total / nodes)
        rows.append((nodes, derive, total))
        print(f"{k:>4} {nodes:>6} {derive:>8.3f} {1e3 * derive / nodes:>8.2f} "
              f"{total:>9.3f} {1e3 * total / nodes:>8.2f}")
    # each layer type is derived once (a fixed cost), then each node adds its own cost: linear
    # growth is a constant cost per further node
    for (n0, d0, t0), (n1, d1, t1) in zip(rows, rows[1:], strict=False):
        print(f"each further node, {n0} -> {n1} nodes: derive {1e3 * (d1 - d0) / (n1 - n0):.2f} "
              f"ms, + module {1e3 * (t1 - t0) / (n1 - n0):.2f} ms")
    print(f"ms per node (+ module), largest / smallest: "
          f"{max(per_node) / min(per_node):.2f} (median {1e3 * statistics.median(per_node):.2f})")


if __name__ == "__main__":
    main()
