"""The test suite's own hygiene: marks sit on tests, not on the helpers they call."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _is_pytest_mark(decorator: ast.expr) -> bool:
    """``@pytest.mark.x`` or ``@pytest.mark.x(...)`` (a fixture is no mark)."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    text = ast.unparse(node)
    return text.startswith("pytest.mark.")


def _marked_helpers(text: str) -> list[str]:
    """Functions not collected by pytest (no ``test_`` prefix) that carry a pytest mark: the
    mark is dropped silently there (the test that calls the helper never sees it)."""
    return [
        node.name
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("test_")
        and any(_is_pytest_mark(d) for d in node.decorator_list)
    ]


def _ruff_tests_without_skip(text: str) -> list[str]:
    """Tests that run the ``ruff`` executable but are not skipped where it is missing."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        runs_ruff = any(
            isinstance(n, ast.Constant) and n.value == "ruff" for n in ast.walk(node)
        )
        skipped = any("skipif" in ast.unparse(d) and "ruff" in ast.unparse(d)
                      for d in node.decorator_list)
        if runs_ruff and not skipped:
            found.append(node.name)
    return found


def test_pytest_marks_sit_on_tests_not_helpers():
    wrong = {
        path.name: names
        for path in sorted(HERE.glob("test_*.py"))
        if (names := _marked_helpers(path.read_text(encoding="utf-8")))
    }
    assert wrong == {}


def test_tests_that_run_ruff_skip_where_it_is_missing():
    wrong = {
        path.name: names
        for path in sorted(HERE.glob("test_*.py"))
        if (names := _ruff_tests_without_skip(path.read_text(encoding="utf-8")))
    }
    assert wrong == {}


def test_the_checks_above_see_a_misplaced_mark():
    # the checks must not pass by seeing nothing: the layout tests/test_codegen.py had
    text = (
        "@pytest.mark.skipif(shutil.which('ruff') is None, reason='no ruff')\n"
        "def helper():\n    pass\n\n"
        "def test_lint():\n    subprocess.run(['ruff', 'check', helper()])\n"
    )
    assert _marked_helpers(text) == ["helper"]
    assert _ruff_tests_without_skip(text) == ["test_lint"]
