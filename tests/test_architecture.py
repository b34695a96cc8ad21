"""The package's shape: one-way imports between the subpackages, subpackage names that no
public function shadows, the version written in one module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import symbp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "symbp"

#: What each part of symbp may import from the rest of it (docs/architecture.md): declaration,
#: then derivation, then the printers and the checker, then flow, then the command line. The
#: runtime (the helpers generated modules copy) imports nothing of symbp.
BOTTOM = {"errors", "naming", "version"}
ALLOWED = {
    "runtime": set(),
    "errors": set(),
    "naming": {"errors"},
    "version": set(),
    "declare": BOTTOM,
    "derivation": BOTTOM | {"declare"},
    "emit": BOTTOM | {"declare", "derivation", "runtime"},
    "checking": BOTTOM | {"declare", "derivation", "emit", "runtime"},
    "flow": BOTTOM | {"declare", "derivation", "emit", "checking", "runtime"},
}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: Path, text: str | None = None) -> set[str]:
    """The parts of symbp that ``path`` (or ``text`` at that path) imports, relative or
    absolute; ``"__init__"`` for a name taken from the package itself (``from .. import x``)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for symbp/x.py, 1 for symbp/pkg/x.py
    text = path.read_text(encoding="utf-8") if text is None else text
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "symbp":
                    continue
                rest = parts[1:]
            elif node.level > depth:  # climbs to the top package
                rest = (node.module or "").split(".") if node.module else []
            else:  # within its own subpackage
                continue
            if rest:
                found.add(rest[0])
            else:
                found |= {alias.name for alias in node.names} & {
                    p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                } or {"__init__"}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "symbp":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_imports_go_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if part not in ALLOWED:  # cli, __init__, __main__: the top, may import anything
            continue
        for imported in _imported_parts(path) - {part}:
            if imported not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert wrong == []


def test_the_one_way_test_sees_an_upward_import():
    # the checker above must not pass by seeing nothing: imports upwards are found
    text = (
        "from ..emit.module import generate_module\nfrom .. import __version__\n"
        "from .forms import Forward\nimport symbp.flow.numeric\n"
    )
    assert _imported_parts(PACKAGE / "declare" / "base.py", text) == {"emit", "__init__", "flow"}


def test_no_subpackage_is_named_like_a_public_function():
    subpackages = {info.name for info in pkgutil.iter_modules([str(PACKAGE)]) if info.ispkg}
    public = {name for name in symbp.__all__ if callable(getattr(symbp, name))}
    assert subpackages and public and not subpackages & public
    for name in subpackages:  # importing every one of them leaves the public functions alone
        importlib.import_module(f"symbp.{name}")
    assert callable(symbp.derive) and callable(symbp.check) and callable(symbp.notes)


def test_the_version_is_written_in_one_module():
    assignments = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", None) == "__version__" for t in targets):
                    assignments.append(path.relative_to(ROOT).as_posix())
    assert assignments == ["symbp/version.py"]
    from symbp.version import __version__

    assert symbp.__version__ == __version__
    assert f"symbp {__version__}" in symbp.codegen(
        symbp.Net([symbp.linear(2)], input_features=2, loss="mse")
    )
