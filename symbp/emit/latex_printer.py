"""Print the engine's sympy expressions as LaTeX for study notes (KaTeX- and pdflatex-safe).

A :class:`~sympy.printing.latex.LatexPrinter` subclass. Two modes, chosen by the ``whole``
setting:

* index form (``whole=False``): ``Indexed`` elements as ``x_{nj}``, full-range sums as
  ``\\sum_{m}``, products by juxtaposition, a scalar factor as a leading fraction:
  ``\\frac{\\gamma_{j} \\tilde{\\sigma}^{-1}_{j}}{N} \\left(N \\frac{\\partial J}{\\partial
  y_{nj}} - \\dots\\right)``;
* whole-array form (``whole=True``, the output of :class:`symbp.derivation.arrays.Lowering`): arrays
  bold (``\\mathbf{W}``, ``\\boldsymbol{\\gamma}``), ``Dot`` as juxtaposition, ``Permute`` as
  ``^{\\top}``, a sum over the batch as ``\\mathbf{1}^{\\top}``, element-wise products as
  ``\\odot`` and element-wise powers as ``^{\\odot 2}``.

Names and numbers print as :mod:`.latex_names` says. The
gradient of the loss with respect to an array ``v`` (the array ``dv``) prints per ``notation``:
``"d2l"`` gives :math:`\\frac{\\partial J}{\\partial v}` (Dive into Deep Learning), ``"cs231n"``
gives :math:`\\mathrm{d}v` (the code names of CS231n; ``dvar`` and ``dinvstd`` as they are, since
:math:`\\mathrm{d}\\sigma^2` reads as a power of a differential).

The step function (``Heaviside(u, 0)``, ``Step(u)``) prints as an indicator ``indicator[u > 0]``
(a tie's ``Heaviside(u, 1/2)`` as ``(indicator[u > 0] + 1/2 indicator[u = 0])``);
KaTeX has ``\\mathbb{1}``, but amssymb's blackboard font has no digits, so LaTeX output uses
``\\mathbb{I}`` (the ``indicator`` setting).

The network-level nodes (:mod:`.notes_nodes`) exist only to be printed: the notes build the
network's equations from them and from the engine's expressions, never from strings.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter, translate
from sympy.printing.precedence import PRECEDENCE

from ..derivation.arrays import ArrayOp, Dot, MaxOver, NewAxis, Permute, Step, SumOver
from .latex_names import SYMBOLS, _bold, _letter, _nice_number
from .layout import split_latex as _split_top_level
from .layout import visible_length as _visible_length
from .notes_nodes import (
    Apply,
    AtLayer,
    Chain,
    Compose,
    Delta,
    Element,
    Ellipsis_,
    Grad,
    Identity,
    InSpace,
    Jacobian,
    NetworkNodePrinting,
    Norm,
    Shape,
    _label,
)

NOTATIONS = ("d2l", "cs231n")

ROW_SEPARATOR = " \\\\\n"


class NotesLatexPrinter(NetworkNodePrinting, LatexPrinter):
    """LaTeX for the notes; see the module docstring for the settings."""

    printmethod = "_latex"  # sympy classes (pi, E) print themselves
    _default_settings = {
        **LatexPrinter._default_settings,
        "notation": "d2l",
        "whole": False,
        "arrays": frozenset(),
        "indicator": r"\mathbb{1}",
        "loss_symbol": "J",
    }

    def __init__(self, settings=None):
        super().__init__(settings)
        if self._settings["notation"] not in NOTATIONS:
            raise ValueError(f"notation must be one of {NOTATIONS}")
        self._settings["arrays"] = frozenset(self._settings["arrays"])

    # -- public helpers -------------------------------------------------------------------------
    def doprint(self, expr) -> str:
        return super().doprint(_implied_broadcasting(expr))

    def equation(self, lhs, rhs) -> str:
        """``lhs = rhs`` on one line."""
        return f"{self.doprint(lhs)} = {self.doprint(rhs)}"

    def rows(self, pairs, *, width: int = 80, relation: str = "=") -> str:
        """The body of an ``aligned`` block: one ``lhs &= rhs`` row per pair, sums that are too
        long (by their LaTeX length) broken after a term and continued on an indented line.
        ``relation`` is ``"="`` or ``"<="`` (printed ``\\le``)."""
        symbol = {"=": "=", "<=": r"\le"}[relation]
        lines = []
        for lhs, rhs in pairs:
            left = self.doprint(lhs)
            parts = self._broken(_implied_broadcasting(rhs), width)
            lines.append(f"{left} &{symbol} {parts[0]}")
            lines += [rf"&\quad {part}" for part in parts[1:]]
        return ROW_SEPARATOR.join(lines)

    def _broken(self, expr, width: int) -> list[str]:
        text = self.doprint(expr)
        if _visible_length(text) <= width:
            return [text]
        if isinstance(expr, sp.Mul):
            groups = [f for f in expr.args if isinstance(f, sp.Add)]
            if len(groups) == 1:  # a coefficient times a long sum: break inside the sum
                (group,) = groups
                lead = self.doprint(expr / group)
                if self._settings["whole"] and self._has_array(expr / group):
                    lead = rf"{lead} \odot"
                parts = self._broken(group, width - _visible_length(lead))
                if len(parts) > 1:
                    parts[0] = rf"{lead} \left({parts[0]}\right."
                    parts[1:-1] = [rf"\left.{p}\right." for p in parts[1:-1]]
                    parts[-1] = rf"\left.{parts[-1]}\right)"
                    return parts
        if not isinstance(expr, sp.Add):
            return _split_top_level(text, width)
        terms = self._add_terms(expr)
        lines: list[str] = []
        current = ""
        for sign, term in terms:
            piece = f"{sign} {term}" if (current or lines or sign == "-") else term
            if current and _visible_length(current + piece) > width:
                lines.append(current)
                current = piece if sign == "-" or not lines else f"{sign} {term}"
            else:
                current = f"{current} {piece}".strip()
        lines.append(current)
        return [piece for line in lines for piece in _split_top_level(line, width)]

    def _add_terms(self, expr: sp.Add) -> list[tuple[str, str]]:
        """Signed printed terms, positive ones first (``x - \\mu``, ``1 - y``)."""
        terms = []
        for term in self._as_ordered_terms(expr, order=None):
            if term.could_extract_minus_sign():
                terms.append(("-", self._print(-term)))
            else:
                terms.append(("+", self._print(term)))
        # positive terms first; among them the longer ones (x W + b, gamma xhat + beta)
        terms.sort(key=lambda pair: (pair[0] == "-", pair[0] == "+" and -len(pair[1])))
        return terms

    # -- names ----------------------------------------------------------------------------------
    def _is_array(self, name: str) -> bool:
        arrays = self._settings["arrays"]
        return name in arrays or (name.startswith("d") and name[1:] in arrays)

    def _is_adjoint(self, name: str) -> bool:
        return name.startswith("d") and name[1:] in self._settings["arrays"]

    def name_tex(
        self,
        name: str,
        *,
        sub: str = "",
        layer: str = "",
        power: int | sp.Expr = 1,
        bold: bool = False,
    ) -> str:
        """An array's symbol with its subscript, layer superscript and power (an integer or any
        real exponent: ``x^{\\frac{3}{2}}_{nj}``, ``\\tilde{\\sigma}^{-\\frac{1}{2}}_{j}``)."""
        accent, letter, own_power = SYMBOLS.get(name, (None, name, 1))
        if name == "L":
            letter = self._settings["loss_symbol"]
        tex = _letter(letter, grouped=bool(sub))
        if bold:
            tex = _bold(tex)
        if accent:
            tex = rf"\{accent}{{{tex}}}"
        total = own_power * power
        elementwise = bold and power != 1
        if layer:
            tex = f"{tex}^{{({layer})}}"
            if sub:
                tex = f"{tex}_{{{sub}}}"
            if total != 1:
                tex = rf"\left({tex}\right)^{{{self._power(total, elementwise)}}}"
            return tex
        if total != 1:
            tex = f"{tex}^{{{self._power(total, elementwise)}}}"
        if sub:
            tex = f"{tex}_{{{sub}}}"
        return tex

    def _power(self, power, elementwise: bool) -> str:
        power = sp.sympify(power)
        text = self._print(power)
        # an element-wise power of an array; negative powers of the named symbols
        # (\tilde{\sigma}^{-1}) are read element-wise without the circle
        if elementwise and not power.is_negative:
            if isinstance(power, sp.Add):
                text = rf"\left({text}\right)"  # \odot (e - 1), not (\odot e) - 1
            return rf"\odot {text}"
        return text

    def grad_tex(self, target: str) -> str:
        """The gradient of the loss with respect to ``target`` (already printed)."""
        if self._settings["notation"] == "d2l":
            return rf"\frac{{\partial {self._settings['loss_symbol']}}}{{\partial {target}}}"
        return rf"\mathrm{{d}}{target}"

    def _array_tex(
        self, name: str, *, sub: str = "", layer: str = "", power: int | sp.Expr = 1
    ) -> str:
        bold = self._settings["whole"] and not sub
        if self._is_adjoint(name):
            if self._settings["notation"] == "cs231n" and SYMBOLS.get(name[1:], (0, 0, 1))[2] != 1:
                # the code's name: dvar, not d\sigma^2 (which reads as a power of a differential)
                tex = _bold(rf"\mathrm{{{name}}}") if bold else rf"\mathrm{{{name}}}"
                if layer:
                    tex = f"{tex}^{{({layer})}}"
                if sub:
                    tex = f"{tex}_{{{sub}}}"
                return rf"\left({tex}\right)^{{{self._power(power, False)}}}" if power != 1 else tex
            inner = self.name_tex(name[1:], sub=sub, layer=layer, bold=bold)
            tex = self.grad_tex(inner)
            return rf"\left({tex}\right)^{{{self._power(power, False)}}}" if power != 1 else tex
        return self.name_tex(name, sub=sub, layer=layer, power=power, bold=bold)

    def _indices_tex(self, indices) -> str:
        printed = [self._print(i) for i in indices]
        if all(len(p) == 1 for p in printed):
            return "".join(printed)
        return ",".join(printed)

    def _print_Symbol(self, expr, style="plain"):
        if self._is_array(expr.name) or expr.name in SYMBOLS or expr.name == "L":
            return self._array_tex(expr.name)
        name = expr.name
        if name == "eps":  # batch norm's eps, as the user writes it, is the epsilon of papers
            return r"\epsilon"
        if len(name) > 1 and name.isalpha() and translate(name) == name:
            return rf"\mathrm{{{name}}}"  # a word (stride, dilation), not a product of letters
        if "_" in name and name.replace("_", "").isalnum():
            return _letter(name)  # H_in: H_{\mathrm{in}}; K_h: K_{h}
        return super()._print_Symbol(expr, style=style)

    def _print_Indexed(self, expr):
        return self._array_tex(expr.base.name, sub=self._indices_tex(expr.indices))

    def _print_IndexedBase(self, expr):
        return self._array_tex(expr.name)

    def _print_Pow(self, expr, rational=False):
        """Any real power. Sympy's ``_print_Pow`` is left only what it prints right here: it
        hands a function base its exponent (``_print_AtLayer(base, exp=...)``, which the notes'
        nodes do not take) and prints a negative rational power through ``_print_Mul``, which
        gave a named array's power back to this method (without end)."""
        base, exponent = expr.args
        if base.is_number and exponent.is_number:
            return super()._print_Pow(expr)
        whole = self._settings["whole"]
        if exponent.is_negative and not self._folds_power(base, exponent):
            # 1/x^p: x^{-1/2} is \frac{1}{\sqrt{x}}, x^{-3/2} is \frac{1}{x^{3/2}}
            positive = base if exponent == -1 else sp.Pow(base, -exponent, evaluate=False)
            return rf"\frac{{1}}{{{self._print(positive)}}}"
        root = self._root_index(exponent)
        name = _array_name(base)
        if name is not None and (root is None or self._folds_power(base, exponent)):
            # the named arrays carry their power: x^{2}_{nj}, \tilde{\sigma}^{-2}_{j},
            # \left(\mathbf{h}^{(1)}\right)^{\odot \frac{3}{2}}
            if isinstance(base, sp.Indexed):
                return self._array_tex(name, sub=self._indices_tex(base.indices), power=exponent)
            if isinstance(base, AtLayer):
                return self._array_tex(name, layer=_label(base.args[1]), power=exponent)
            return self._array_tex(name, power=exponent)
        if root is not None:
            inner = self._print(base)
            return rf"\sqrt{{{inner}}}" if root == 2 else rf"\sqrt[{root}]{{{inner}}}"
        if isinstance(base, Element) and isinstance(base.args[0], AtLayer):
            node, *indices = base.args
            layer_name, label = node.args
            return self.name_tex(
                layer_name.name, sub=self._indices_tex(indices), layer=_label(label), power=exponent
            )
        own = base.is_Function and self._prints_itself(base)
        if own or (whole and self._has_array(base)):
            # a node of the notes (its printer takes no exponent) or an element-wise power
            if own:
                inner = rf"\left({self._print(base)}\right)"
            else:
                inner = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
            power = self._power(exponent, whole and self._has_array(base))
            return rf"{inner}^{{{power}}}"
        return super()._print_Pow(expr)

    def _root_index(self, exponent) -> int | None:
        """``q`` when ``exponent`` is ``1/q`` and roots are printed as roots, else None."""
        if (
            self._settings["root_notation"]
            and exponent.is_Rational
            and exponent.p == 1
            and exponent.q != 1
        ):
            return int(exponent.q)
        return None

    @staticmethod
    def _folds_power(base, exponent) -> bool:
        """True when the power is written on the array's own symbol (``x^{-1}_{nj}``): integer
        powers of named arrays, and any power of a symbol that has one of its own
        (``\\tilde{\\sigma}^{-\\frac{1}{2}}``, ``\\sigma`` for the square root of ``var``)."""
        name = _array_name(base)
        if name is None:
            return False
        return bool(exponent.is_Integer) or SYMBOLS.get(name, (None, name, 1))[2] != 1

    def _prints_itself(self, expr) -> bool:
        """True when this class, not sympy, prints ``expr`` (its printer takes no exponent)."""
        for cls in type(expr).__mro__:
            method = "_print_" + cls.__name__
            if hasattr(self, method):
                return any(method in c.__dict__ for c in (NotesLatexPrinter, NetworkNodePrinting))
        return False

    # -- numbers --------------------------------------------------------------------------------
    def _print_Rational(self, expr):
        nice = _nice_number(expr)
        if isinstance(nice, str):
            return nice
        if nice != expr:
            return self._print(nice)
        return super()._print_Rational(expr)

    # -- products and sums ------------------------------------------------------------------------
    def _has_array(self, expr) -> bool:
        if isinstance(expr, sp.Indexed | AtLayer | Delta | ArrayOp):
            return True
        if isinstance(expr, sp.Symbol):
            return self._is_array(expr.name) or expr.name in SYMBOLS
        return any(self._has_array(a) for a in expr.args)

    def _print_Mul(self, expr):
        if expr.could_extract_minus_sign() and not expr.is_number:
            inner = self._print_Mul(-expr)
            return f"- {inner}"
        numerator, denominator = [], []
        for factor in expr.as_ordered_factors():
            if (
                isinstance(factor, sp.Pow)
                and factor.exp.is_negative
                and not self._folds_power(factor.base, factor.exp)
            ):
                denominator.append(factor.base ** (-factor.exp))
            elif factor.is_Rational and isinstance(_nice_number(factor), str):
                numerator.append(factor)  # 0.1, 10^{-5}: as written, not a fraction
            elif factor.is_Rational and factor.q != 1:
                factor = _nice_number(factor)  # the float nearest 1/3 is 1/3
                if factor.p != 1:
                    numerator.append(sp.Integer(factor.p))
                denominator.append(sp.Integer(factor.q))
            else:
                numerator.append(factor)
        whole = self._settings["whole"]
        if denominator and any(self._has_array(d) for d in denominator if whole):
            # element-wise division: one fraction
            top = self._product(numerator) if numerator else "1"
            return rf"\frac{{{top}}}{{{self._product(denominator)}}}"
        # The lead is a plain coefficient (a fraction when there is a denominator); tall or
        # long factors (gradients, sums, parenthesized sums) follow it.
        lead_factors, rest = [], []
        for factor in numerator:
            tall = isinstance(factor, sp.Add | sp.Sum) or _is_adjoint_node(factor, self)
            if whole:
                tall = tall or self._has_array(factor)
            (rest if tall else lead_factors).append(factor)
        rest.sort(key=lambda f: (isinstance(f, sp.Add), isinstance(f, sp.Sum)))
        # a word (stride) before the letters it multiplies: \mathrm{stride}\, p
        lead_factors.sort(key=lambda f: not self._is_word(f))
        lead = self._product(lead_factors) if lead_factors else ""
        if denominator:
            lead = rf"\frac{{{lead or '1'}}}{{{self._product(denominator)}}}"
        if not rest:
            return lead or "1"
        body = self._product(rest, alone=not lead)
        return f"{lead} {body}" if lead else body

    def _print_Add(self, expr, order=None):
        terms = self._add_terms(expr)
        text = ""
        for position, (sign, term) in enumerate(terms):
            if position == 0:
                text = f"- {term}" if sign == "-" else term
            else:
                text = f"{text} {sign} {term}"
        return text

    def _product(self, factors, *, alone: bool = True) -> str:
        whole = self._settings["whole"]
        texts = []
        for position, factor in enumerate(factors):
            last = position == len(factors) - 1
            if isinstance(factor, sp.Add) and (len(factors) > 1 or not alone):
                texts.append(rf"\left({self._print(factor)}\right)")
            elif isinstance(factor, sp.Sum | sp.Piecewise) and not last:
                texts.append(rf"\left({self._print(factor)}\right)")
            elif isinstance(factor, sp.Mul) and len(factors) > 1:
                texts.append(rf"\left({self._print(factor)}\right)")
            else:
                texts.append(self._print(factor))
        if not whole:
            out = ""
            for position, text in enumerate(texts):
                if position and self._is_word(factors[position - 1]):
                    out = rf"{out}\, {text}"  # \mathrm{stride}\, p: a thin space after a word
                else:
                    out = f"{out} {text}" if out else text
            return out
        # scalars by juxtaposition, arrays joined by the element-wise product
        out = ""
        for factor, text in zip(factors, texts, strict=True):
            if not out:
                out = text
            elif self._has_array(factor) and self._has_array_before(factors, factor):
                out = rf"{out} \odot {text}"
            else:
                out = f"{out} {text}"
        return out

    def _is_word(self, factor) -> bool:
        """A symbol printed as an upright word (stride, padding)."""
        return (
            isinstance(factor, sp.Symbol)
            and not self._is_array(factor.name)
            and factor.name not in SYMBOLS
            and factor.name != "eps"  # printed as the letter epsilon
            and len(factor.name) > 1
            and factor.name.isalpha()
            and translate(factor.name) == factor.name
        )

    def _has_array_before(self, factors, factor) -> bool:
        index = next(i for i, f in enumerate(factors) if f is factor)
        return any(self._has_array(f) for f in factors[:index])

    def _print_Sum(self, expr):
        below = []
        plain = True
        for index, low, high in expr.limits:
            full = low == 0 and isinstance(high + 1, sp.Symbol)
            plain = plain and full
            below.append((index, low, high, full))
        if plain:
            indices = ",".join(self._print(i) for i, *_ in below)
            head = rf"\sum_{{{indices}}}"
        else:
            head = "".join(
                rf"\sum_{{{self._print(i)}={self._print(lo)}}}^{{{self._print(hi)}}}"
                for i, lo, hi, _ in below
            )
        body = expr.function
        text = self._print(body)
        if isinstance(body, sp.Add):
            text = rf"\left({text}\right)"
        return f"{head} {text}"

    # -- functions ------------------------------------------------------------------------------
    def _indicator(self, argument, at_zero=0) -> str:
        indicator = self._settings["indicator"]
        text = rf"{indicator}\left[{self._print(argument)} > 0\right]"
        if at_zero == 0:
            return text
        # a tie of max/min: the value at 0 too (1/2)
        zero = rf"{indicator}\left[{self._print(argument)} = 0\right]"
        return rf"\left({text} + {self._print(at_zero)} {zero}\right)"

    def _print_Heaviside(self, expr, exp=None):
        return self._indicator(*expr.args[:2])

    def _print_Step(self, expr):
        return self._indicator(*expr.args[:2])

    def _print_Sigmoid(self, expr):
        return rf"\operatorname{{sigmoid}}\left({self._print(expr.args[0])}\right)"

    def _print_Softplus(self, expr):
        return rf"\operatorname{{softplus}}\left({self._print(expr.args[0])}\right)"

    def _print_Dot(self, expr):
        left, right = expr.args
        return f"{self._operand(left)} {self._operand(right)}"

    def _operand(self, expr) -> str:
        text = self._print(expr)
        if isinstance(expr, sp.Add | sp.Mul):
            return rf"\left({text}\right)"
        return text

    def _print_Reshape(self, expr):
        array, *dims = expr.args
        shape = r" \times ".join(self._print(d) for d in dims)
        return rf"\operatorname{{reshape}}_{{{shape}}}\left({self._print(array)}\right)"

    def _print_Permute(self, expr):
        if len(expr.args) == 1:
            operand = expr.args[0]
            text = self._operand(operand)
            if isinstance(operand, AtLayer) and text.endswith(")}"):
                return text[:-1] + r"\top}"  # one superscript: h^{(3)\top}
            if "^" in text and not text.startswith(r"\left("):
                text = rf"\left({text}\right)"
            elif self._settings["notation"] == "d2l" and _is_adjoint_node(operand, self):
                text = rf"\left({text}\right)"
            return rf"{text}^{{\top}}"
        perm = ",".join(str(int(p)) for p in expr.args[1])
        return rf"\operatorname{{transpose}}_{{({perm})}}\left({self._print(expr.args[0])}\right)"

    def _print_SumOver(self, expr):
        array, axes = expr.args
        axes = tuple(int(a) for a in axes)
        ones = r"\mathbf{1}"
        inner = self._print(array)
        if isinstance(array, sp.Add | sp.Mul | sp.Piecewise):
            inner = rf"\left({inner}\right)"
        if axes == (0,):
            return rf"{ones}^{{\top}} {inner}"
        if axes == (0, 1):
            return rf"{ones}^{{\top}} {inner} {ones}"
        if axes == (1,):
            return rf"{inner} {ones}"
        listed = ",".join(map(str, axes))
        return rf"\operatorname{{sum}}_{{({listed})}}\left({self._print(array)}\right)"

    def _print_MaxOver(self, expr):
        array, axes = expr.args
        listed = ",".join(str(int(a)) for a in axes)
        return rf"\operatorname{{max}}_{{({listed})}}\left({self._print(array)}\right)"

    # -- windows (pooling, convolution) ---------------------------------------------------------
    def _print_WindowMax(self, expr):
        indices = ",".join(self._print(v) for v in expr.variables)
        return rf"\max_{{{indices}}} {self._print(expr.function)}"

    def _print_FirstArgmax(self, expr):
        window, *point = expr.args
        indices = ",".join(self._print(v) for v in window.variables)
        at = ",".join(self._print(v) for v in point)
        where = rf"\operatorname{{argmax}}_{{{indices}}} {self._print(window.function)}"
        return rf"{self._settings['indicator']}\left[({at}) = {where}\right]"

    def _print_KroneckerDelta(self, expr, exp=None):
        # An indicator, not delta: the notes' delta is the backpropagated gradient.
        first, second = (self._print(a) for a in expr.args)
        return rf"{self._settings['indicator']}\left[{first} = {second}\right]"


def _implied_broadcasting(expr):
    """Broadcasting is implied in the notes: ``a[:, None]`` prints as ``a``."""
    return sp.sympify(expr).replace(lambda e: isinstance(e, NewAxis), lambda e: e.args[0])


def _array_name(expr) -> str | None:
    if isinstance(expr, sp.Indexed):
        return expr.base.name
    if isinstance(expr, AtLayer):
        return expr.args[0].name
    if isinstance(expr, sp.Symbol) and expr.name in SYMBOLS:
        return expr.name
    return None


def _is_adjoint_node(expr, printer: NotesLatexPrinter) -> bool:
    if isinstance(expr, Delta):
        return False
    name = _array_name(expr) or (expr.name if isinstance(expr, sp.Symbol) else None)
    return name is not None and printer._is_adjoint(name)


def latex(expr, **settings) -> str:
    """Print ``expr`` with :class:`NotesLatexPrinter` and the given settings."""
    return NotesLatexPrinter(settings).doprint(expr)


__all__ = [
    "AtLayer",
    "Apply",
    "Chain",
    "Ellipsis_",
    "Compose",
    "Delta",
    "Dot",
    "Grad",
    "Element",
    "Identity",
    "InSpace",
    "Norm",
    "ROW_SEPARATOR",
    "Jacobian",
    "MaxOver",
    "NotesLatexPrinter",
    "Permute",
    "Shape",
    "Step",
    "SumOver",
    "latex",
]
