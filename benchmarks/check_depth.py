"""How the cost of ``symbp check`` grows with depth (issue 27, item 13).

Specs of 8, 16, 32 and 64 blocks of ``linear(64) -> batchnorm -> relu`` (64 input features,
then ``linear(10)`` and softmax cross-entropy: 25, 49, 97 and 193 layers) are written to a
temporary folder and checked with ``python -m symbp check SPEC`` at the defaults (``--batch 4``,
``--seed 0``), each in a child process with one BLAS thread. For each depth the script prints
the child's CPU time (user + sys, which other people's jobs on a shared machine do not
inflate), the CPU time per layer, its ratio to the shallowest depth's (flat or falling:
linear growth; doubling with depth: quadratic), the CPU time each added layer cost since the
previous depth (flat: linear; growing: worse), and whether the check passed (exit 0). The
fixed part (start-up, deriving and generating the module: about 2 s) makes the time per layer
fall with depth where the growth is linear.

Run: ``python benchmarks/check_depth.py [--depths 8 16 32 64] [--width 64]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = ('[[layers]]\ntype = "linear"\nout = {width}\n\n[[layers]]\ntype = "batchnorm"\n\n'
         '[[layers]]\ntype = "relu"\n\n')


def spec_text(blocks: int, width: int) -> str:
    """``blocks`` times linear(width) -> batchnorm -> relu, then linear(10), softmax CE."""
    return (f'name = "deep{blocks}"\ninput = {{ features = {width} }}\n'
            'loss = "softmax_cross_entropy"\n\n' + BLOCK.format(width=width) * blocks
            + '[[layers]]\ntype = "linear"\nout = 10\n')


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--show", action="store_true", help="print each check's table")
    args = parser.parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"{'blocks':>6} {'layers':>6} {'CPU s':>8} {'ms/layer':>9} {'ratio':>6} "
          f"{'ms/added layer':>15}  result")
    first = previous = None
    with tempfile.TemporaryDirectory() as folder:
        for blocks in args.depths:
            path = Path(folder) / f"deep{blocks}.toml"
            path.write_text(spec_text(blocks, args.width))
            layers = 3 * blocks + 1
            before = child_cpu()
            done = subprocess.run([sys.executable, "-m", "symbp", "check", str(path)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            cpu = child_cpu() - before
            per_layer = cpu / layers
            first = first or per_layer
            added = "" if previous is None else (
                f"{1000 * (cpu - previous[1]) / (layers - previous[0]):.1f}")
            previous = (layers, cpu)
            result = {0: "pass", 1: "FAIL"}.get(done.returncode, f"exit {done.returncode}")
            print(f"{blocks:>6} {layers:>6} {cpu:>8.1f} {1000 * per_layer:>9.1f} "
                  f"{per_layer / first:>6.2f} {added:>15}  {result}", flush=True)
            if args.show or done.returncode not in (0, 1):
                print(done.stdout[-3000:], done.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
