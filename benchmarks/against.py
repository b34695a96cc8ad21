"""Old generated code against new: the modules another git revision of symbp generates, timed in
the same process as this checkout's, call by call.

``--against REV`` of ``generated_vs_numpy.py`` and ``conv_vs_numpy.py`` uses it: the tree of
``REV`` is unpacked (``git archive REV | tar -x``) into a temporary folder, a child Python
imports *that* symbp (its own templates too) and generates the benchmark's networks from their
TOML spec text; the sources are written to temporary files and loaded here beside the modules
this checkout generates. Both must compute the same loss and gradients (to the dtype's
rounding) before they are timed; then :func:`race` calls them alternately (new, old; old,
new; ...) and reports the median of the per-round ratios new / old, of wall time and of this
process's CPU time (with one thread, the CPU time is the figure a shared machine disturbs
least).

    python benchmarks/generated_vs_numpy.py --against fcd9d2d
    python benchmarks/conv_vs_numpy.py --against fcd9d2d

The goal of issue 23: the redesigned code is no slower, new / old <= 1.02.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL = 1.02

#: Run in the child, with the old tree's folder as argument: spec texts (JSON on stdin) in,
#: generated sources (JSON on stdout) out. It refuses to run a symbp or templates from anywhere
#: else (an editable install of another checkout maps ``symbp.templates`` elsewhere).
_CHILD = r"""
import json, sys
root = sys.argv[1]
sys.path.insert(0, root)
import symbp
from symbp.declare.spec import parse_spec
from symbp.emit import template_folder
from symbp.emit.module import generate_module
assert symbp.__file__.startswith(root), symbp.__file__
assert template_folder().startswith(root), template_folder()
specs = json.load(sys.stdin)
json.dump({key: generate_module(parse_spec(text)) for key, text in specs.items()}, sys.stdout)
"""


def unpack(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` of this repository, unpacked under ``into``; its
    ``templates/`` also copied to ``symbp/templates`` (where the import system finds package
    ``symbp.templates`` before any editable install's mapping)."""
    root = into / "tree"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    if (root / "templates").is_dir() and not (root / "symbp" / "templates").exists():
        shutil.copytree(root / "templates", root / "symbp" / "templates")
    return root


def old_sources(rev: str, specs: Mapping[str, str]) -> dict[str, str]:
    """The sources the symbp of ``rev`` generates for each spec text (by key)."""
    with tempfile.TemporaryDirectory(prefix="symbp-against-") as folder:
        root = unpack(rev, Path(folder))
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(root)], input=json.dumps(dict(specs)),
            capture_output=True, text=True, cwd=folder,
        )
    if result.returncode != 0:
        raise RuntimeError(f"symbp at {rev} failed to generate:\n{result.stderr}")
    return json.loads(result.stdout)


def load_source(source: str, name: str, folder: Path):
    """Write ``source`` to ``folder/name.py`` and import it from there."""
    path = folder / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def old_modules(rev: str, specs: Mapping[str, str], folder: Path) -> dict:
    """The modules ``rev`` generates for each spec text, loaded from files in ``folder``."""
    sources = old_sources(rev, specs)
    return {key: load_source(sources[key], f"old_{rev}_{key}", folder) for key in specs}


def largest_difference(new: tuple, old: tuple) -> float:
    """Largest difference between two ``(loss, grads)`` results, relative to the largest
    gradient (and to the loss for the loss); raises if they do not have the same arrays."""
    (loss_new, grads_new), (loss_old, grads_old) = new, old
    if grads_new.keys() != grads_old.keys():
        raise AssertionError(f"gradients differ in names: {sorted(grads_new)} {sorted(grads_old)}")
    worst = abs(float(loss_new) - float(loss_old)) / max(1.0, abs(float(loss_old)))
    scale = max(float(np.max(np.abs(g))) for g in grads_old.values()) or 1.0
    for name, g in grads_old.items():
        got = grads_new[name]
        if got.shape != g.shape or got.dtype != g.dtype:
            raise AssertionError(f"{name}: {got.dtype}{got.shape} vs {g.dtype}{g.shape}")
        worst = max(worst, float(np.max(np.abs(got - g), initial=0.0)) / scale)
    return worst


def race(new: Callable[[], object], old: Callable[[], object], repeats: int = 21,
         warmup: int = 2) -> dict:
    """Call ``new`` and ``old`` alternately (the order swapped every round), ``repeats`` rounds
    after ``warmup``, the garbage collector paused; the medians of their wall and CPU times and
    the medians of the per-round ratios new / old."""
    times: dict[str, dict[str, list[float]]] = {
        "new": {"wall": [], "cpu": []}, "old": {"wall": [], "cpu": []}}
    fns = {"new": new, "old": old}
    for _ in range(warmup):
        new()
        old()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in ("new", "old") if r % 2 == 0 else ("old", "new"):
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name]()
                t1, c1 = time.perf_counter(), time.process_time()
                times[name]["wall"].append(t1 - t0)
                times[name]["cpu"].append(c1 - c0)
    finally:
        if was_enabled:
            gc.enable()
    result = {}
    for clock in ("wall", "cpu"):
        result[f"new_{clock}_s"] = statistics.median(times["new"][clock])
        result[f"old_{clock}_s"] = statistics.median(times["old"][clock])
        result[f"{clock}_ratio"] = statistics.median(
            a / b for a, b in zip(times["new"][clock], times["old"][clock], strict=True)
            if b > 0)
    return result


def header(rev: str) -> str:
    return (f"new (this checkout) / old (generated by {rev}), one thread, median of per-round "
            f"ratios (goal <= {GOAL})\n"
            f"{'net':<8}{'dtype':>9}{'new ms':>9}{'old ms':>9}{'wall':>8}{'cpu':>8}"
            f"{'diff':>10}  verdict")


def row(net: str, dtype: str, result: dict, difference: float) -> str:
    ratios = (result["wall_ratio"], result["cpu_ratio"])
    verdict = ("ok" if max(ratios) <= GOAL else "MISSED" if min(ratios) > GOAL
               else "ok by " + ("cpu" if ratios[1] <= GOAL else "wall"))
    return (f"{net:<8}{dtype:>9}{result['new_wall_s'] * 1e3:9.2f}{result['old_wall_s'] * 1e3:9.2f}"
            f"{ratios[0]:8.3f}{ratios[1]:8.3f}{difference:10.1e}  {verdict}")
