"""The one line breaker (symbp/emit/layout.py): one scanner of groups, one splitter, one greedy
filler, read by code, docstring formulas and LaTeX alike."""

import ast

from symbp.emit.layout import _fill, _scan, _top_level_split, _words, split_latex, wrap_line


def test_the_scanner_counts_each_kind_of_texts_groups():
    code = 'f(a, "(", b[1])'
    depths = {position: depth for position, _, depth in _scan(code)}
    assert depths[1] == 0 and depths[3] == 1 and depths[len(code) - 1] == 0  # f( , )
    assert all(position not in depths for position in (5, 6, 7))  # the string literal "("
    assert depths[code.index("1")] == 2
    latex = r"\left( a b \right) \{ c"
    words = _words(latex, opening="{", latex=True)
    assert words == [r"\left( a b \right)", r"\{", "c"]  # \{ is no brace, \left( is a group


def test_the_splitter_keeps_separators_inside_groups_whole():
    parts = _top_level_split("g(a, b), c[0, 1], 'x, y'", (", ",))
    assert [part for _, part in parts] == ["g(a, b)", "c[0, 1]", "'x, y'"]
    assert [separator for separator, _ in parts] == ["", ",", ","]


def test_the_filler_packs_greedily_and_indents_continuations():
    words = ["aaaa", "bb", "cccc", "d", "eeeeeeeeeeee"]
    lines = _fill(words, 9, indent="  ")
    assert lines == ["aaaa bb", "  cccc d", "  eeeeeeeeeeee"]  # a long word: its own line
    assert all(len(line) <= 9 for line in lines[:-1])
    assert " ".join(line.strip() for line in lines) == " ".join(words)


def test_code_docstrings_and_latex_break_at_their_own_groups():
    line = "    result = some_function(" + ", ".join(f"argument_{k}" for k in range(12)) + ")"
    wrapped = wrap_line(line)
    assert len(wrapped) > 1 and all(len(w) <= 99 for w in wrapped)
    assert ast.dump(ast.parse("\n".join(wrapped).strip())) == ast.dump(ast.parse(line.strip()))
    math = r"a + \left(b + c + d\right) \cdot e + f"
    pieces = split_latex(math, 12)
    assert r"\left(b + c + d\right)" in " ".join(pieces)  # never broken inside the group
    assert all(not piece.endswith(("+", "=")) for piece in pieces)  # an operator leads a line
