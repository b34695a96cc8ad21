"""Layout of generated text: one line breaker for code, docstring formulas and LaTeX.

Every long line symbp writes is broken the same way: :func:`_scan` reads the text's groups
(brackets, and string literals in code; index brackets in formulas; braces and
``\\left...\\right`` in LaTeX), :func:`_top_level_split` cuts it at separators outside every
group, and :func:`_fill` packs the pieces greedily into lines of a width. The three kinds of
text differ only in their groups, their separators and the width they measure:

- :func:`wrap_line` breaks a long line of generated Python inside its longest bracket pair, as
  black would (the arguments of a call on one line of their own, else one per line; long
  assignment targets in parentheses); the templates apply it to every line they assemble
  (the ``wrap_lines`` filter) and the function builder to every statement;
- :func:`formula` writes an index formula for a docstring on one line, or with a hanging
  indent at spaces outside index brackets;
- :func:`split_latex` breaks printed math at spaces outside braces, keeping an operator with
  the term after it, and measures the width the math shows (:func:`visible_length`).
"""

from __future__ import annotations

import re
import textwrap

import sympy as sp

#: the longest line of generated code (ruff's limit in the projects that read it)
MAX_LINE = 99


class FormulaPrinter(sp.printing.str.StrPrinter):
    """One-line index formulas: ``z[n, j] = sum_i(W[i, j]*x[n, i]) + b[j]``,
    ``sum_{c, i, j}(...)`` over several indices, ``step(u)``, ``delta(h, k + p)``."""

    def _print_Sum(self, expr):
        indices = [self._print(limit[0]) for limit in expr.limits]
        under = indices[0] if len(indices) == 1 else "{" + ", ".join(indices) + "}"
        return f"sum_{under}({self._print(expr.function)})"

    def _print_Heaviside(self, expr):
        if expr.args[1:] in ((), (0,)):
            return f"step({self._print(expr.args[0])})"
        return f"heaviside({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_KroneckerDelta(self, expr):
        return f"delta({self._print(expr.args[0])}, {self._print(expr.args[1])})"


def formula(lhs: sp.Expr, rhs: sp.Expr) -> str:
    """``lhs = rhs`` on one line, or wrapped with a hanging indent when longer than a line,
    at spaces outside index brackets (``dy[n, o, h - k]`` and ``sum_{m, r, s}`` stay whole)
    where that fits."""
    printer = FormulaPrinter()
    lhs, rhs = _rank_free(lhs, rhs)
    text = f"{printer.doprint(lhs)} = {printer.doprint(rhs)}"
    width = MAX_LINE - 8
    words = [piece for word in _words(text, opening="[{") for piece in _cut(word, width - 4)]
    if max(map(len, words)) > width - 4:  # an index expression longer than a line
        words = text.split(" ")
    return "\n    ".join(_fill(words, width, indent="    "))


def _cut(word: str, width: int) -> list[str]:
    """A word (a product of factors) longer than ``width`` cut after a factor's ``*``."""
    pieces = []
    while len(word) > width:
        cuts = [m.end() for m in re.finditer(r"[)\]]\*", word) if m.end() <= width]
        if not cuts:
            break
        pieces.append(word[: cuts[-1]])
        word = word[cuts[-1] :]
    return [*pieces, word]


def _rank_free(lhs: sp.Expr, rhs: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """An element-wise formula over a batch, every array read at the left side's own indices
    and nothing summed, as ``y[...] = Max(0, x[...])``: the same text for inputs of any rank,
    so that the layer's functions on (N, F) and (N, C, H, W) inputs are one function."""
    if not isinstance(lhs, sp.Indexed) or len(lhs.indices) < 2:
        return lhs, rhs
    if rhs.has(sp.Sum, sp.KroneckerDelta):
        return lhs, rhs
    elements = rhs.atoms(sp.Indexed)
    if not elements or any(e.indices != lhs.indices for e in elements):
        return lhs, rhs
    every = sp.Symbol("...")
    read = rhs.xreplace({e: e.base[every] for e in elements})
    if read.free_symbols & set(lhs.indices):
        return lhs, rhs  # an index outside the arrays (a position-dependent value)
    return lhs.base[every], read


def wrap_lines(text: str) -> str:
    """:func:`wrap_line` on every line of ``text`` (a jinja2 filter for template lines that
    carry long names)."""
    return "\n".join(wrapped for line in text.split("\n") for wrapped in wrap_line(line))


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _scan(text: str, opening: str = "([{", quotes: bool = True, latex: bool = False):
    """``(position, char, depth)`` for each character outside string literals (``quotes``);
    ``depth`` counts the groups open before it: the bracket pairs of ``opening`` and, in
    ``latex``, ``\\left...\\right`` (a closing bracket has its pair's depth). In LaTeX a
    command's backslash and the character after it are skipped (``\\{`` is no brace)."""
    closing = "".join(_CLOSING[char] for char in opening)
    depth, quote, position = 0, None, 0
    while position < len(text):
        char = text[position]
        if quote:
            quote = None if char == quote else quote
        elif quotes and char in "\"'":
            quote = char
        elif latex and char == "\\":
            for command, step in ((r"\left", 1), (r"\right", -1)):
                end = position + len(command)
                if text.startswith(command, position) and not text[end : end + 1].isalpha():
                    depth += step
                    position = end
                    break
            else:
                position += 2
            continue
        else:
            if char in closing:
                depth -= 1
            yield position, char, depth
            if char in opening:
                depth += 1
        position += 1


def _outer_brackets(code: str) -> list[tuple[int, int]]:
    """``(open, close)`` positions of the outermost bracket pairs, string literals skipped."""
    pairs, start = [], 0
    for position, char, depth in _scan(code):
        if depth == 0 and char in "([{":
            start = position
        elif depth == 0 and char in ")]}":
            pairs.append((start, position))
    return pairs


def _top_level_split(code: str, separators: tuple[str, ...], **groups) -> list[tuple[str, str]]:
    """``code`` split at separators outside groups (:func:`_scan`'s, ``groups`` its keywords):
    ``(separator, part)`` pairs, the separator before each part stripped (``""`` first)."""
    parts, last, before, skip_to = [], 0, "", 0
    for position, _, depth in _scan(code, **groups):
        if position < skip_to or depth:
            continue
        found = next((s for s in separators if code.startswith(s, position)), None)
        if found:
            parts.append((before, code[last:position].strip()))
            before, last = found.strip(), position + len(found)
            skip_to = last
    parts.append((before, code[last:].strip()))
    return parts


def _words(text: str, **groups) -> list[str]:
    """``text`` split at its spaces outside groups (:func:`_scan`'s, no string literals)."""
    return [word for _, word in _top_level_split(text, (" ",), quotes=False, **groups)]


def _fill(words: list[str], width: int, indent: str = "", measure=len) -> list[str]:
    """``words`` packed greedily into lines at most ``width`` wide by ``measure`` (a word wider
    than that gets a line of its own); lines after the first start with ``indent``."""
    lines: list[str] = []
    current = ""
    for word in words:
        joined = f"{current} {word}" if current and word else current or word
        if current and measure(joined) > width:
            lines.append(current)
            current = indent + word
        else:
            current = joined
    return [*lines, current]


def wrap_line(line: str, width: int = MAX_LINE) -> list[str]:
    """A long line of generated code split inside its longest bracket pair, as black would."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    pairs = _outer_brackets(line)
    if not pairs:
        return [line]
    # calls before subscripts: params[\n"key"\n] = ... reads badly
    calls = [pair for pair in pairs if line[pair[0]] == "("]
    start, end = max(calls or pairs, key=lambda pair: pair[1] - pair[0])
    content = line[start + 1 : end]
    inner = indent + "    "
    head, tail = line[: start + 1], indent + line[end:]
    if len(head) > width:  # long assignment targets (long layer names): one per line
        split = _top_level_split(line.strip(), (" = ",))
        targets = _top_level_split(split[0][1], (", ",)) if len(split) == 2 else []
        if len(targets) > 1:
            rest = wrap_line(f"{indent}_ = {split[1][1]}", width)  # "_" stands for ")"
            rest[0] = f"{indent}){rest[0][len(indent) + 1 :]}"
            return [f"{indent}(", *[f"{inner}{t}," for _, t in targets], *rest]
    if len(inner + content) <= width and len(tail) <= width:
        return [head, inner + content, tail]  # the bracket's contents fit on a line of their own
    args = _top_level_split(content, (", ",))
    if len(args) > 1:
        body = [f"{inner}{arg}," for _, arg in args]
    else:
        terms = _top_level_split(content, (" + ", " - "))
        body = [f"{inner}{sign} {term}" if sign else inner + term for sign, term in terms]
    wrapped = [head]
    for part in body:
        wrapped += wrap_line(part, width)
    if len(tail) > width:  # a sum of long terms: in parentheses, a term a line (as black)
        terms = _top_level_split(line.strip(), (" = ",))
        summed = _top_level_split(terms[-1][1], (" + ", " - ")) if len(terms) == 2 else []
        if len(summed) > 1:
            lines = [f"{indent}{terms[0][1]} = ("]
            for sign, term in summed:
                lines += wrap_line(f"{inner}{sign} {term}" if sign else inner + term, width)
            return [*lines, f"{indent})"]
    return [*wrapped, tail]


def _sentence(text: str) -> str:
    """``text`` cut into docstring lines (the template indents them)."""
    return "\n    ".join(textwrap.wrap(text, MAX_LINE - 4, subsequent_indent="    "))


# -- LaTeX (the notes) ---------------------------------------------------------------------
_COMMAND = re.compile(r"\\[A-Za-z]+|[{}^_]")
#: Tokens that bind to what follows them when a long line is broken.
_OPERATORS = {"+", "-", r"\odot", "="}


def split_latex(text: str, width: int) -> list[str]:
    """Break printed math that is wider than ``width`` at spaces outside braces and
    ``\\left...\\right`` groups (between factors of a product), never inside a group, and never
    right after an operator. A line-breaking pass over the printer's own output: it chooses
    where lines end, it does not change the math."""
    if visible_length(text) <= width:
        return [text]
    tokens = _words(text, opening="{", latex=True)
    words: list[str] = []
    for token in tokens:
        if words and words[-1].split(" ")[-1] in _OPERATORS | {r"\sum"} | {""}:
            words[-1] = f"{words[-1]} {token}"
        elif words and words[-1].startswith(r"\sum") and " " not in words[-1]:
            words[-1] = f"{words[-1]} {token}"  # a sum keeps its first factor
        elif token in _OPERATORS and words:
            words.append(token)
        else:
            words.append(token)
    return _fill(words, width, measure=visible_length)


def visible_length(text: str) -> int:
    """A rough width of printed LaTeX: commands and braces count as little as they show."""
    return len(_COMMAND.sub("", text)) + text.count(r"\frac") * 2
