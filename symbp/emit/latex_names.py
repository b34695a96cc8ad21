"""How names and numbers print in the notes' LaTeX.

Names follow the problem (``xhat`` is :math:`\\hat{x}`, ``var`` :math:`\\sigma^2`, ``invstd``
:math:`\\tilde{\\sigma}^{-1}`), Greek names as Greek letters, a name of several letters
upright (``xp`` is :math:`\\mathrm{xp}`, ``H_in`` :math:`H_{\\mathrm{in}}`); constants as a spec
writes them (``0.1``, ``10^{-5}``; the float nearest 1/3 as :math:`\\frac{1}{3}`).
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.latex import translate

#: Names with a conventional symbol: (accent, letter, power). ``invstd`` is the inverse of
#: ``\tilde{\sigma} = \sqrt{\sigma^2 + \epsilon}``, so its powers combine: ``invstd**2`` prints
#: as ``\tilde{\sigma}^{-2}``.
SYMBOLS: dict[str, tuple[str | None, str, int]] = {
    "xhat": ("hat", "x", 1),
    "var": (None, "sigma", 2),
    "invstd": ("tilde", "sigma", -1),
    "running_mean": ("bar", "mu", 1),
    "running_var": ("bar", "sigma", 2),
}

#: Multi-letter names printed as an operator name.
OPERATOR_NAMES = {"lse"}


def _letter(name: str, grouped: bool = False) -> str:
    """A name's symbol: Greek names as Greek letters, one letter in italic, and a name of
    several letters (``xp``, the ``in`` of ``H_in``) upright, so that it does not read as a
    product of letters. ``grouped``: a name with a subscript of its own in parentheses, for an
    element's indices to follow (``\\left(W_{\\mathrm{hh}}\\right)_{ji}``, not a double
    subscript)."""
    if name in OPERATOR_NAMES:
        return rf"\operatorname{{{name}}}"
    base, *subscripts = name.split("_")
    if not base:
        return translate(name)
    tex = _word(base)
    if subscripts:
        tex = f"{tex}_{{{','.join(_word(sub) for sub in subscripts)}}}"
        return rf"\left({tex}\right)" if grouped else tex
    return tex


def _word(part: str) -> str:
    """One part of a name: a Greek letter, a letter (italic) or a word (upright)."""
    translated = translate(part)
    if translated != part or len(part) == 1 or not part.isalpha():
        return translated
    return rf"\mathrm{{{part}}}"


def _bold(letter: str) -> str:
    if letter.startswith(r"\operatorname"):
        return letter
    if letter.startswith(r"\mathrm{"):
        return r"\mathbf{" + letter[len(r"\mathrm{") :]
    return rf"\boldsymbol{{{letter}}}" if letter.startswith("\\") else rf"\mathbf{{{letter}}}"


def _nice_number(value: sp.Rational) -> sp.Rational | str:
    """A constant as people write it: ``0.1``, ``0.25``, ``10^{-5}``, ``5 \\cdot 10^{-4}`` for a
    decimal fraction (what a spec writes as ``1e-5``), ``1/3`` for the float nearest 1/3
    (``3333333333333333/10^16``, a spec's ``1/3`` read as a float); otherwise the value itself
    (printed as a fraction)."""
    p, q = int(value.p), int(value.q)
    k = len(str(q)) - 1
    if q > 1 and q == 10**k:
        if abs(p) < 10 and k >= 4:
            power = rf"10^{{-{k}}}"
            return power if p == 1 else (f"- {power}" if p == -1 else rf"{p} \cdot {power}")
        if k <= 3:
            sign = "-" if p < 0 else ""
            whole, part = divmod(abs(p), q)
            return f"{sign}{whole}.{str(part).rjust(k, '0').rstrip('0')}"
    if q > 10**6:  # from a float: the simple fraction it rounds, if there is one
        from fractions import Fraction

        simple = Fraction(p, q).limit_denominator(1000)
        if float(simple) == float(Fraction(p, q)):
            return sp.Rational(simple.numerator, simple.denominator)
    return value
