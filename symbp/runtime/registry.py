"""The registry of the runtime's helpers, read from the helper modules' own source.

Each top-level definition of a helper module (a function, or a constant such as a table of
coefficients or the threads' ``_PARTS``) is a :class:`Helper`: its source lines (with the
comment lines just above it), the other helpers it names, and the imports it needs, all found
from the module's syntax tree. Nothing here is kept by hand: a helper that starts calling
another, or ``math``, is copied with it the next time a module is generated.

A generated module asks for the helpers its code calls (its entry points, e.g. ``_sigmoid``);
:func:`closure` adds everything they name, transitively, and the public functions of the
modules they come from (``set_threads``, the interface of the threads that ``_in_parts`` uses).
:func:`source` gives their text in a fixed order (:data:`MODULES`, then each module's own order),
and :func:`imports` the import statements besides NumPy's.

Rules the helper modules keep, checked here: top-level statements are imports, definitions
and assignments to one name; a name is defined in one helper module only; imports are
``import numpy as np``, standard-library modules, or other helper modules' names
(``from .threads import _in_parts``); every comment line belongs to the definition just below it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

#: The helper modules, in the order their helpers are copied into a generated module.
MODULES = (
    "threads", "rows", "blocks", "stable", "special", "windows", "pooling", "products", "targets",
    "gather",
)

#: The import every helper module and every generated module has: not listed by imports().
NUMPY_IMPORT = "import numpy as np"


@dataclass(frozen=True)
class Helper:
    """One top-level definition of a helper module."""

    name: str
    module: str
    #: Its place in the order helpers are copied in (MODULES, then source order).
    index: int
    #: Its source lines, from the comment lines just above it to its last line.
    source: str
    #: The text between the previous definition of its module and it (blank lines).
    gap: str
    #: The other helpers it names.
    uses: frozenset[str]
    #: The import statements it needs, besides NumPy's (``import math``).
    imports: frozenset[str]


class RuntimeRuleError(ValueError):
    """A helper module breaks a rule the copying relies on (see the module docstring)."""


@cache
def helpers() -> dict[str, Helper]:
    """Every helper of :data:`MODULES`, by name, in copying order."""
    parsed = [_parse(name) for name in MODULES]
    owner: dict[str, str] = {}
    for module, definitions, _ in parsed:
        for name in definitions:
            if name in owner:
                raise RuntimeRuleError(f"{name} is defined in {owner[name]} and in {module}")
            owner[name] = module
    table: dict[str, Helper] = {}
    for module, definitions, bindings in parsed:
        for bound, statement in bindings.items():
            if statement is None and bound not in owner:
                raise RuntimeRuleError(f"{module}.py imports {bound}, which no helper defines")
        for name, (node, source, gap) in definitions.items():
            named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - {name}
            table[name] = Helper(
                name=name,
                module=module,
                index=len(table),
                source=source,
                gap=gap,
                uses=frozenset(named & owner.keys()),
                imports=frozenset(
                    bindings[n] for n in named
                    if bindings.get(n) not in (None, NUMPY_IMPORT) and n not in owner
                ),
            )
    return table


def closure(entry_points: Iterable[str]) -> list[str]:
    """The helpers that entry_points need, themselves included, in copying order: what they
    name, transitively, and the public functions (no leading underscore) of their modules."""
    table = helpers()
    todo = list(entry_points)
    unknown = sorted(set(todo) - table.keys())
    if unknown:
        raise KeyError(f"no runtime helper named {', '.join(unknown)}")
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        helper = table[name]
        todo.extend(helper.uses)
        todo.extend(
            other.name for other in table.values()
            if other.module == helper.module and not other.name.startswith("_")
        )
    return sorted(found, key=lambda name: table[name].index)


def imports(names: Iterable[str]) -> list[str]:
    """The import statements the helpers named need, besides NumPy's, sorted as isort does."""
    table = helpers()
    statements = {statement for name in names for statement in table[name].imports}
    return sorted(statements, key=lambda s: (s.startswith("from "), s.split()[1], s))


def source(names: Iterable[str]) -> str:
    """The source of the helpers named, in copying order: two blank lines between them, or
    their own spacing where they follow each other in their module (a group of constants)."""
    table = helpers()
    chosen = sorted(set(names), key=lambda name: table[name].index)
    text = []
    for k, name in enumerate(chosen):
        helper = table[name]
        if k:
            previous = table[chosen[k - 1]]
            adjacent = previous.module == helper.module and previous.index + 1 == helper.index
            text.append(helper.gap if adjacent else "\n\n\n")
        text.append(helper.source)
    return "".join(text)


def _parse(module_name: str):
    """(module name, {definition: (node, source, gap)}, {bound name: import statement, or None
    for a helper imported from another helper module}) for one helper module."""
    module = importlib.import_module(f"{__package__}.{module_name}")
    text = inspect.getsource(module)
    lines = text.splitlines()
    tree = ast.parse(text)
    definitions: dict[str, tuple] = {}
    bindings: dict[str, str | None] = {}
    previous_end = 0  # the last line of the previous statement
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        previous_end = body[0].end_lineno
        body = body[1:]
    for node in body:
        where = f"{module_name}.py, line {node.lineno}"
        start = node.lineno
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            start = node.decorator_list[0].lineno
        while start - 1 > previous_end and lines[start - 2].lstrip().startswith("#"):
            start -= 1
        between = lines[previous_end : start - 1]
        if any(line.strip() for line in between):
            raise RuntimeRuleError(f"{where}: a comment that belongs to no definition")
        gap = "\n" * (len(between) + 1)
        previous_end = node.end_lineno
        if isinstance(node, ast.Import | ast.ImportFrom):
            if definitions:
                raise RuntimeRuleError(f"{where}: an import after a definition")
            bindings.update(_bindings(node, where))
            continue
        if isinstance(node, ast.FunctionDef):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
            node.targets[0], ast.Name
        ):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            raise RuntimeRuleError(f"{where}: not an import, a function or a named constant")
        definitions[name] = (node, "\n".join(lines[start - 1 : node.end_lineno]), gap)
    if any(line.strip() for line in lines[previous_end:]):
        raise RuntimeRuleError(f"{module_name}.py: a comment after its last definition")
    return module_name, definitions, bindings


def _bindings(node: ast.Import | ast.ImportFrom, where: str) -> dict[str, str | None]:
    """The names an import binds: each with the statement that binds it in a generated module,
    or None for a helper imported from another helper module (copied, not imported)."""
    found: dict[str, str | None] = {}
    for alias in node.names:
        if isinstance(node, ast.ImportFrom) and node.level:
            if alias.asname:
                raise RuntimeRuleError(f"{where}: a helper imported under another name")
            found[alias.name] = None
            continue
        module = alias.name if isinstance(node, ast.Import) else node.module or ""
        if isinstance(node, ast.Import):
            statement = f"import {alias.name}"
            bound = alias.asname or alias.name.split(".")[0]
        else:
            statement = f"from {module} import {alias.name}"
            bound = alias.asname or alias.name
        if alias.asname:
            statement += f" as {alias.asname}"
        if module.split(".")[0] == "numpy" and statement != NUMPY_IMPORT:
            raise RuntimeRuleError(f"{where}: NumPy is imported as `{NUMPY_IMPORT}`")
        if module.split(".")[0] not in (*sys.stdlib_module_names, "numpy"):
            raise RuntimeRuleError(f"{where}: {module} is neither NumPy nor the standard library")
        found[bound] = statement
    return found
