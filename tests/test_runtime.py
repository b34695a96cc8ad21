"""The runtime's registry (symbp/runtime/registry.py): what a generated module copies.

The registry finds each helper's calls and imports by walking its syntax tree; these tests
check the copies with another reading of the same code, Python's own symbol tables
(:mod:`symtable`): every name a copied function reads from module scope is defined in the copy
(nothing missing), and every copied helper is read by what calls it (nothing extra).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import symtable
import sys
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.emit.module import generate_module
from symbp.emit.numpy_printer import HELPERS
from symbp.runtime import registry

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(registry.__file__).parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def _reads(source: str) -> dict[str, set[str]]:
    """For each top-level function of source, the module-scope names it (or a lambda or
    function inside it) reads, builtins left out."""
    found = {}
    for table in symtable.symtable(source, "<copied>", "exec").get_children():
        names, todo = set(), [table]
        while todo:
            scope = todo.pop()
            todo.extend(scope.get_children())
            names |= {s.get_name() for s in scope.get_symbols() if s.is_global()}
        found[table.get_name()] = names - set(dir(builtins))
    # a constant computed by a call (a table of coefficients) reads what its value names
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and isinstance(node.value, ast.Call):
                found[target.id] = {n.id for n in ast.walk(node.value)
                                    if isinstance(n, ast.Name)} - set(dir(builtins))
    return found


def _top_level(source: str) -> set[str]:
    """The names source defines at module level (functions, constants, imports)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _reached(roots: set[str], reads: dict[str, set[str]]) -> set[str]:
    reached, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(reads.get(name, ()))
    return reached


def _copy(entry_points) -> tuple[list[str], str]:
    """The helpers a module calling entry_points gets, and their text as the module has it."""
    names = registry.closure(entry_points)
    text = "\n".join([*registry.imports(names), registry.NUMPY_IMPORT, "", ""])
    return names, text + "\n" + registry.source(names) + "\n"


@pytest.mark.parametrize("entry", sorted(HELPERS.values()))
def test_each_printed_helper_copies_what_it_needs_and_nothing_else(entry):
    names, text = _copy([entry])
    defined = _top_level(text)
    reads = _reads(text)
    # Nothing missing: each name a copied function reads from module scope is in the copy.
    for function, read in reads.items():
        assert read <= defined, (function, read - defined)
    # Nothing extra: each copied helper is read from the entry point (set_threads, the threads'
    # interface, from nothing: it comes with _in_parts).
    public = {name for name in names if not name.startswith("_")}
    assert public <= {"set_threads"} and bool(public) == ("_in_parts" in names)
    assert _reached({entry, *public}, reads) >= set(names)
    assert set(names) == defined - {"np", "math", "concurrent"}
    # ruff-clean modules import what they use and nothing else
    imported = {"math", "concurrent"} & defined
    assert imported == {name for read in reads.values() for name in read} & {"math", "concurrent"}
    namespace = {}
    exec(compile(text, "<copied>", "exec"), namespace)  # noqa: S102 - our own runtime's source
    assert callable(namespace[entry])


def test_the_copies_are_the_runtime_functions_verbatim_and_compute_the_same():
    table = registry.helpers()
    namespace = {}
    _, text = _copy(table)  # every helper
    exec(compile(text, "<copied>", "exec"), namespace)  # noqa: S102 - our own runtime's source
    for name, helper in table.items():
        original = getattr(sys.modules[f"symbp.runtime.{helper.module}"], name)
        if inspect.isfunction(original):
            assert helper.source.endswith(inspect.getsource(original).rstrip("\n")), name
        else:
            # tables of coefficients (tuples, or arrays computed on import), sizes, state
            assert np.array_equal(namespace[name], original) if isinstance(
                original, np.ndarray) else namespace[name] == original, name
    x = np.random.default_rng(0).standard_normal((40, 30)) * 10
    for name in ("_sigmoid", "_softplus", "_erf", "_erfc"):
        original = getattr(sys.modules[f"symbp.runtime.{table[name].module}"], name)
        assert np.array_equal(namespace[name](x), original(x)), name
        single = x.astype(np.float32)  # _erf's own path for float32
        assert np.array_equal(namespace[name](single), original(single)), name


def test_the_copying_order_is_fixed_and_groups_each_module():
    table = registry.helpers()
    assert [h.index for h in table.values()] == list(range(len(table)))
    modules = [h.module for h in table.values()]
    assert modules == sorted(modules, key=registry.MODULES.index)
    shuffled = sorted(table, key=lambda name: name[::-1])
    assert registry.closure(shuffled) == list(table)
    assert registry.source(shuffled) == registry.source(list(table))


def test_adjacent_constants_keep_their_spacing():
    text = registry.source(["_PARTS", "_PART_SIZE"])
    assert text.count("\n") == 1  # one line each, as in threads.py
    assert registry.source(["_PARTS", "_in_parts"]).count("\n\n\n") == 1


def test_the_runtime_imports_numpy_and_the_standard_library_only():
    """Every import in symbp/runtime: numpy (as np), the standard library, or a sibling module
    (from .threads import ...); nothing from the rest of symbp."""
    for path in sorted(RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top in sys.stdlib_module_names or (
                        alias.name == "numpy" and alias.asname == "np"), (path.name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module in registry.MODULES, path.name
                else:
                    assert node.module.split(".")[0] in sys.stdlib_module_names, path.name


@pytest.mark.parametrize(
    "statement",
    ["import scipy.special", "from numpy import exp", "import numpy", "from .threads import "
     "_in_parts as run"],
)
def test_the_registry_refuses_imports_a_generated_module_could_not_copy(statement):
    with pytest.raises(registry.RuntimeRuleError):
        registry._bindings(ast.parse(statement).body[0], "here")


def test_every_name_the_printer_prints_is_a_runtime_helper():
    assert set(HELPERS.values()) <= registry.helpers().keys()
    with pytest.raises(KeyError, match="_nothing"):
        registry.closure(["_sigmoid", "_nothing"])


def _module_helpers(source: str) -> tuple[set[str], set[str]]:
    """The runtime helpers a generated module defines, and those its own code reaches."""
    reads = _reads(source)
    runtime_names = _top_level(source) & registry.helpers().keys()
    own = set(reads) - runtime_names  # forward, backward, the layer functions, ...
    return runtime_names, _reached(own, reads)


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda path: path.stem)
def test_a_generated_module_holds_just_the_helpers_its_code_calls(spec):
    source = generate_module(symbp.load_spec(spec))
    defined, reached = _module_helpers(source)
    assert defined <= reached | {"set_threads"}
    assert defined >= {name for name in reached if name in registry.helpers()}


def test_a_dense_sigmoid_net_gets_the_sigmoid_alone():
    net = symbp.Net([symbp.linear(4, bias=False), symbp.sigmoid()], input_features=3)
    source = generate_module(net)
    defined, _ = _module_helpers(source)
    assert defined == {"_sigmoid", "_exp_minus_abs", "set_threads"}
    assert "import math" not in source and "import concurrent" not in source
    assert "_PARTS" not in source and "def set_threads(count):" in source  # the template's


def test_one_hot_rows_put_a_one_at_each_label_in_the_outputs_dtype():
    from symbp.runtime.targets import _one_hot

    y = np.array([2, 0, 2, 1])
    out = np.zeros((4, 3), dtype=np.float32)
    rows = _one_hot(y, out)
    assert rows.dtype == np.float32 and rows.shape == (4, 3)
    for n, label in enumerate(y):  # one 1, in the label's column
        assert rows[n, label] == 1 and rows[n].sum() == 1
    assert _one_hot(np.array([], dtype=int), out).shape == (0, 3)
