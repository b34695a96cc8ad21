"""Layout of generated text: one line breaker for code and docstring formulas.

:func:`wrap_line` breaks a long line of generated Python inside its longest bracket pair, as
black would (the arguments of a call on one line of their own, else one per line; long
assignment targets in parentheses); the templates apply it to every line they assemble
(the ``wrap_lines`` filter) and the function builder to every statement. :func:`formula`
writes an index formula for a docstring on one line, or with a hanging indent at spaces
outside index brackets.
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
    words = _outside_brackets(text)
    if max(map(len, words)) > width - 4:  # an index expression longer than a line
        words = text.split(" ")
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append("    " + word)
    return "\n    ".join(lines)


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


def _outside_brackets(text: str) -> list[str]:
    """``text`` split at its spaces that are not inside square brackets or braces (the
    indices of a sum)."""
    words, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {"[": 1, "]": -1, "{": 1, "}": -1}.get(char, 0)
        if char == " " and depth == 0:
            words.append(text[start:position])
            start = position + 1
    return [*words, text[start:]]


def wrap_lines(text: str) -> str:
    """:func:`wrap_line` on every line of ``text`` (a jinja2 filter for template lines that
    carry long names)."""
    return "\n".join(wrapped for line in text.split("\n") for wrapped in wrap_line(line))


def _scan(code: str):
    """``(position, char, depth)`` for each character outside string literals; ``depth``
    counts the brackets open before it (a closing bracket has its pair's depth)."""
    depth, quote = 0, None
    for position, char in enumerate(code):
        if quote:
            quote = None if char == quote else quote
            continue
        if char in "\"'":
            quote = char
            continue
        if char in ")]}":
            depth -= 1
        yield position, char, depth
        if char in "([{":
            depth += 1


def _outer_brackets(code: str) -> list[tuple[int, int]]:
    """``(open, close)`` positions of the outermost bracket pairs, string literals skipped."""
    pairs, start = [], 0
    for position, char, depth in _scan(code):
        if depth == 0 and char in "([{":
            start = position
        elif depth == 0 and char in ")]}":
            pairs.append((start, position))
    return pairs


def _top_level_split(code: str, separators: tuple[str, ...]) -> list[tuple[str, str]]:
    """``code`` split at separators outside brackets and strings: ``(separator, part)`` pairs."""
    parts, last, before, skip_to = [], 0, "", 0
    for position, char, depth in _scan(code):
        if position < skip_to or depth or char in "([{)]}":
            continue
        found = next((s for s in separators if code.startswith(s, position)), None)
        if found:
            parts.append((before, code[last:position].strip()))
            before, last = found.strip(), position + len(found)
            skip_to = last
    parts.append((before, code[last:].strip()))
    return parts


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
    tokens, depth, start, k = [], 0, 0, 0
    while k < len(text):
        if text.startswith(r"\left", k) and not text[k + 5 : k + 6].isalpha():
            depth += 1
            k += 5
            continue
        if text.startswith(r"\right", k) and not text[k + 6 : k + 7].isalpha():
            depth -= 1
            k += 6
            continue
        char = text[k]
        if char == "\\":
            k += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == " " and depth == 0:
            tokens.append(text[start:k])
            start = k + 1
        k += 1
    tokens.append(text[start:])
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
    lines, current = [], ""
    for word in words:
        if current and visible_length(f"{current} {word}") > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    lines.append(current)
    return lines


def visible_length(text: str) -> int:
    """A rough width of printed LaTeX: commands and braces count as little as they show."""
    return len(_COMMAND.sub("", text)) + text.count(r"\frac") * 2
