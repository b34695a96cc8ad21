"""Generate a stand-alone NumPy module for a network.

The module's structure comes from ``templates/module.py.j2`` and ``templates/function.py.j2``;
every expression in it comes from the engine's derivation, lowered to whole-array form
(:mod:`symbp.derive.arrays`), made numerically safe (:func:`~symbp.derive.arrays.stabilize`),
shared where it repeats (sympy ``cse``) and printed by :class:`SymbpNumPyPrinter`.
One forward/backward function pair is emitted per distinct layer math (every ``linear`` layer
calls ``linear_forward``), and the network's ``forward``/``backward`` call them in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jinja2
import sympy as sp

from .. import __version__
from ..declare.forms import Forward
from ..declare.layers import Layer
from ..declare.net import Net
from ..derive.arrays import (
    Col2Im,
    Col2ImTensorDot,
    Dot,
    FirstArgmaxMask,
    FirstMaxCol2Im,
    Flipped,
    Lowering,
    NewAxis,
    Permute,
    Shifted,
    Step,
    TensorDot,
    Windows,
    WindowTensorDot,
    stabilize,
)
from ..derive.layer import Carried, LayerDerivation
from ..derive.network import NetworkDerivation, derive_network
from ..derive.plan import build_plan
from ..derive.readings import computed_form, reading
from . import template_folder
from .network import backward_steps, forward_steps, inits, size_values  # noqa: F401
from .numpy_printer import (
    RowVector,
    SymbpNumPyPrinter,
    accurate_forms,
    array_shape,
    float_constants,
    is_smaller,
    numpy_code,
)

OVERWRITE_NOTE = "overwrite=True: {name} may be overwritten (the caller no longer needs it)."
OUT_NOTE = "an array to write that gradient into (else a new one is made)."
MAX_LINE = 99
# Helpers that cut their work into parts on set_threads(...) threads (helper "parts").
PARTED_HELPERS = {
    "col2im", "col2im_tensordot", "first_argmax_mask", "first_max_col2im", "shifted",
    "tensordot", "window_max", "window_tensordot",
}


def environment() -> jinja2.Environment:
    """The jinja2 environment over the templates shipped in the package."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_folder()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["wrap_lines"] = wrap_lines
    return env


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


@dataclass
class _Function:
    """What one generated function needs: its code and how to call it."""

    name: str
    source: str
    helpers: set[str] = field(default_factory=set)


@dataclass
class _Statement:
    """``target = code``, then ``extra`` lines updating ``target`` in place."""

    target: str
    code: str
    extra: list[str] = field(default_factory=list)
    overwrites: bool = False  # writes into the argument the caller lets it overwrite
    fresh: bool = True  # the value is a new array (or the memory of a dead one), not a view
    call: tuple[str, list[str]] | None = None  # (function, arguments) when ``code`` is a call
    into: bool = False  # written into the array the keyword ``<target>_out`` gives

    def lines(self, optional: bool = False) -> list[str]:
        """The statement's lines; ``optional``: computed only ``if input_grad``."""
        if not optional:
            return [*self._first(4), *self.extra]
        if not self.extra and self.call is None:
            return [f"{self.target} = {self.code} if input_grad else None"]
        body = [*self._first(8), *self.extra]
        return [f"{self.target} = None", "if input_grad:", *["    " + line for line in body]]

    def _first(self, indent: int) -> list[str]:
        line = f"{self.target} = {self.code}"
        if self.call is None or indent + len(line) <= MAX_LINE + 1:
            return [line]
        function, args = self.call
        return [f"{self.target} = {function}(", *[f"    {a}," for a in args], ")"]


#: Node types whose NumPy result is a new array of numbers (not a view, not booleans).
_FRESH = (sp.Add, sp.Mul, sp.Pow, sp.Function, sp.Max, sp.Min, sp.Piecewise)
#: Node types NumPy computes as a view of their argument (axes moved, inserted, cut or flipped).
_VIEWS = (Permute, NewAxis, Shifted, Flipped)


def _is_fresh(value: sp.Expr) -> bool:
    if isinstance(value, _VIEWS):  # views: of a new array, new too
        return not isinstance(value.args[0], sp.Symbol) and _is_fresh(value.args[0])
    if isinstance(value, Windows | Step):  # overlapping views; a bool array
        return False
    return isinstance(value, _FRESH) and not isinstance(value, sp.Rel)


def _reuse_memory(
    ordered, shapes, returned: set[str], writable: str | None, printer, into: set[str] = frozenset()
):
    """Print ``ordered`` assignments, computing element-wise results into dead arrays.

    A donor is a big array of the result's shape that no later statement reads and the
    function does not return: a temporary computed earlier in the function, or ``writable``
    (an argument; used only when the caller passes ``overwrite=True``). The result is computed
    by a NumPy ufunc with ``out=`` the donor, and the remaining terms of a sum are added in
    place (``dx -= ...``): the same operations, in the same order, without new memory.
    A matrix product assigned to a name in ``into`` goes to ``<name>_out`` (a keyword argument:
    an array the caller lets the function overwrite, or None for a new one).
    """
    statements = []
    local: set[str] = set()
    for position, (target, value) in enumerate(ordered):
        later = set().union(*[v.free_symbols for _, v in ordered[position + 1 :]])
        later_names = {s.name for s in later} | returned
        shape = shapes.get(target)
        donors = []
        for symbol in sorted(value.free_symbols, key=lambda s: s.name):
            name = symbol.name
            if name in later_names or shape is None or shapes.get(name) != shape:
                continue
            if name in local or name == writable:
                donors.append(symbol)
        donors.sort(key=lambda s: s.name == writable)  # temporaries first: no flag needed
        statement = None
        if target in into and isinstance(value, Dot):
            matmul = printer._module_format("numpy.matmul")
            args = [*(printer.doprint(a) for a in value.args), f"out={target}_out"]
            code = f"{matmul}({', '.join(args)})"
            statement = _Statement(target, code, call=(matmul, args), into=True)
        for donor in donors if statement is None else []:
            statement = _into(target, value, donor, donor.name == writable, printer)
            if statement is not None:
                break
        if statement is None and shape is not None and sum(d != 1 for d in shape) >= 2:
            statement = _accumulate(target, value, shape, shapes, printer)
        if statement is None:
            statement = _Statement(target, printer.doprint(value))
        statement.fresh = _is_fresh(value)
        statements.append(statement)
        if _is_fresh(value):
            local.add(target)
    return statements


def _into(target: str, value: sp.Expr, donor: sp.Symbol, flagged: bool, printer):
    """``target = value`` computed in the memory of ``donor``, or None if it does not fit."""
    out = f"{donor.name} if overwrite else None" if flagged else donor.name

    def ufunc(name, first, second):
        if printer.is_row_of(second, first) or printer.is_row_of(first, second):
            code = printer.row_pass(name, first, second, out=out)
            return code, None
        function = printer._module_format("numpy." + name)
        factor = printer.factor_code if name == "multiply" else printer.doprint
        args = [printer.doprint(first), factor(second), f"out={out}"]
        return f"{function}({', '.join(args)})", (function, args)

    def product(term):  # ``donor * rest`` if the donor is a direct factor of ``term``
        factors = list(sp.Mul.make_args(term))
        if factors.count(donor) != 1 or any(f.has(donor) for f in factors if f != donor):
            return None
        factors.remove(donor)
        return sp.Mul(*factors)

    if isinstance(value, sp.Mul):
        rest = product(value)
        if rest is None:
            return None
        code, call = ufunc("multiply", donor, rest)
        return _Statement(target, code, overwrites=flagged, call=call)
    if isinstance(value, sp.Max | sp.Min) and len(value.args) == 2 and donor in value.args:
        other = value.args[1] if value.args[0] == donor else value.args[0]
        if other.has(donor):
            return None
        name = "maximum" if isinstance(value, sp.Max) else "minimum"
        code, call = ufunc(name, donor, other)
        return _Statement(target, code, overwrites=flagged, call=call)
    if not isinstance(value, sp.Add):
        return None
    terms = list(printer._as_ordered_terms(value))
    carrying = [t for t in terms if t.has(donor)]
    if len(carrying) != 1:
        return None
    (term,) = carrying
    others = [t for t in terms if t is not term]
    if term == donor:
        second = others.pop(0)
        if second.could_extract_minus_sign():
            code, call = ufunc("subtract", donor, -second)
        else:
            code, call = ufunc("add", donor, second)
    else:
        rest = product(term)
        if rest is None:
            return None
        code, call = ufunc("multiply", donor, rest)
    extra = [
        _update(target, "-", -t, printer)
        if t.could_extract_minus_sign()
        else _update(target, "+", t, printer)
        for t in others
    ]
    return _Statement(target, code, extra, overwrites=flagged, call=call)


def _place_rows(ordered, shapes):
    """Wrap the vectors each element-wise pass over a big array broadcasts along its rows in
    :class:`RowVector` when the function computes them (``gamma*invstd``, a local ``mu``);
    vectors the function is given (parameters, cached statistics) are left as they are."""
    computed = {target for target, _ in ordered}
    placed = []
    for target, value in ordered:
        shape = shapes.get(target)
        if shape is not None and sum(d != 1 for d in shape) >= 2:
            value = _rows_in(value, shape, shapes, computed)
        placed.append((target, value))
    return placed


def _rows_in(expr: sp.Expr, shape, shapes, computed: set[str]) -> sp.Expr:
    """``expr`` (of ``shape``) with its computed row-vector operands wrapped in RowVector."""

    def row(operand):  # a vector as long as a row: broadcast along the rows
        own = array_shape(operand, shapes)
        return own is not None and len(own) == 1 and own[0] == shape[-1] and own[0] != 1

    def scalar(operand):
        return array_shape(operand, shapes) == ()

    def fresh(vector):  # computed in every call, not handed in
        return not vector.is_Symbol or vector.name in computed

    def operand(arg):
        if row(arg):
            coefficient, vector = arg.as_coeff_Mul()
            return coefficient * RowVector(vector) if fresh(vector) else arg
        return _rows_in(arg, shape, shapes, computed)

    if isinstance(expr, sp.Mul):
        # The row-sized factors and the scalars multiplying them form one vector (NumPy
        # computes ``c/N*xhat`` as ``(c/N)*xhat``): that product is what gets wrapped.
        coefficient, rest = expr.as_coeff_Mul()
        factors = sp.Mul.make_args(rest)
        small = [f for f in factors if row(f) or scalar(f)]
        if any(row(f) for f in small) and len(small) < len(factors):
            others = [operand(f) for f in factors if f not in small]
            vector = sp.Mul(*small)
            wrapped = RowVector(vector) if fresh(vector) else vector
            return sp.Mul(coefficient, wrapped, *others)
        if len(small) < len(factors):
            return sp.Mul(coefficient, *[operand(f) for f in factors])
        return expr
    if isinstance(expr, sp.Add | sp.Max | sp.Min | sp.Pow | sp.Piecewise) or (
        isinstance(expr, sp.Function) and not isinstance(expr, RowVector)
    ):
        if type(expr).__module__.endswith("arrays"):
            return expr  # windows, products, scatters: not element-wise passes
        args = [operand(a) for a in expr.args]
        return expr.func(*args) if args != list(expr.args) else expr
    return expr


def _c_ordered(value: sp.Expr) -> bool:
    """Whether NumPy computes ``value`` as a new array in C order (not a permuted view)."""
    if isinstance(value, _VIEWS):
        return False
    if isinstance(value, TensorDot):  # its axes come out of the product in ``order``
        order = [int(k) for k in value.args[4]]
        return order == sorted(order)
    return not isinstance(value, WindowTensorDot)  # its route decides its memory order


def _accumulate(target: str, value: sp.Expr, shape, shapes, printer):
    """``k*(A + B + ...)`` (or a plain sum) built up in one new array, or None.

    The array starts as one product term of the sum (the only new memory); the other terms are
    added in place, a bare array ``A`` by ``np.subtract(A, target, out=target)`` when the
    array holds a negated partial sum, and the small factor ``k`` multiplies last, in place.
    NumPy evaluating the one-line form needs a second array for ``A - B*C`` (it cannot reuse
    the right operand of a subtraction).
    """
    factor, body = sp.S.One, value
    if isinstance(value, sp.Mul):
        small = [f for f in value.args if is_smaller(f, shape, shapes)]
        big = [f for f in value.args if f not in small]
        if len(big) != 1 or not isinstance(big[0], sp.Add):
            return None
        factor, body = sp.Mul(*small), big[0]
    if not isinstance(body, sp.Add):
        return None

    def bare(term):
        return magnitude(term).is_Symbol

    def magnitude(term):
        return -term if term.could_extract_minus_sign() else term

    terms = list(printer._as_ordered_terms(body))
    # The start must print as a new array (``A.T`` is a view of ``A``: never start there).
    products = [
        t
        for t in terms
        if not is_smaller(t, shape, shapes) and not bare(t) and _is_fresh(magnitude(t))
    ]
    bares = [t for t in terms if not is_smaller(t, shape, shapes) and bare(t)]
    if not bares and factor == 1:
        # ``x @ W + b`` on one line makes NumPy write the sum into a second big array (it
        # reuses a temporary's memory only when the other operand is a scalar): adding ``b``
        # in place took half the time (78 against 154 us at (256, 1024) float32). Only from an
        # array in C order: a permuted view would hand its layout on to the result.
        products = [t for t in products if _c_ordered(magnitude(t))]
    if not products:
        return None
    start = next((t for t in products if not t.could_extract_minus_sign()), products[0])
    negated = start.could_extract_minus_sign()  # the array holds minus the partial sum
    code = printer.doprint(-start if negated else start)
    extra = []
    ufunc = printer._module_format

    for term in bares:
        array = magnitude(term)
        positive = not term.could_extract_minus_sign()
        if negated and positive:  # -(partial) + A
            extra.append(f"{ufunc('numpy.subtract')}({array}, {target}, out={target})")
            negated = False
        elif negated:  # -(partial) - A = -(partial + A)
            extra.append(f"{target} += {array}")
        else:
            extra.append(f"{target} {'+' if positive else '-'}= {array}")
    for term in [t for t in terms if t is not start and t not in bares]:
        subtract = term.could_extract_minus_sign() != negated
        extra.append(_update(target, "-" if subtract else "+", magnitude(term), printer))
    if negated:  # the array holds minus the sum: negate it, or fold the sign into the factor
        if factor == 1:
            extra.append(f"{ufunc('numpy.negative')}({target}, out={target})")
        else:
            factor = -factor
    if factor != 1:
        extra.append(_update(target, "*", factor, printer))
    return _Statement(target, code, extra)


_UFUNCS = {"+": "add", "-": "subtract", "*": "multiply"}


def _update(target: str, operator: str, term: sp.Expr, printer) -> str:
    """``target <operator>= term``, through ``_along_rows`` (the printer's ``row_pass``) when
    ``term`` is a vector broadcast along the rows of the 2-D ``target``."""
    array = sp.Symbol(target)
    if printer.is_row_of(term, array):
        return printer.row_pass(_UFUNCS[operator], array, term, out=target)
    return f"{target} {operator}= {printer.doprint(term)}"


def _wrap_call(prefix: str, call: str, args: list[str], indent: str = "") -> str:
    """``prefix + call(args)``, split one argument per line when it would be too long; an
    assignment's targets (``prefix``, ``"a, b = "``) too, in parentheses, where even the
    first line would be (long layer names)."""
    line = f"{indent}{prefix}{call}({', '.join(args)})"
    if len(line) + 4 <= MAX_LINE:  # the template indents the body by 4
        return line
    inner = indent + "    "
    if len(f"{indent}{prefix}{call}(") + 4 > MAX_LINE and prefix.endswith(" = "):
        targets = "".join(f"{inner}{t},\n" for _, t in _top_level_split(prefix[:-3], (", ",)))
        prefix = f"(\n{targets}{indent}) = "
    body = "".join(f"{inner}{arg},\n" for arg in args)
    return f"{indent}{prefix}{call}(\n{body}{indent})"


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


class ModuleBuilder:
    """Collects the layer functions and the network's forward/backward lines."""

    def __init__(self, derivation: NetworkDerivation):
        self.derivation = derivation
        self.net = derivation.net
        self.env = environment()
        self.functions: dict[str, _Function] = {}
        self.helpers: set[str] = set()
        self.uses_rng = False
        self.uses_state = False
        #: function name -> whether it takes ``overwrite=`` (may compute in its first argument)
        self.overwrites: dict[str, bool] = {}
        self.size_keywords: dict[str, list[str]] = {}  # sizes a function takes as keywords
        self.unbound: list[str] = []
        #: stem -> whether the forward output / the input gradient is a new array nobody else
        #: holds (the caller may then let the next function overwrite it)
        self.owned_output: dict[str, bool] = {}
        self.owned_grad: dict[str, bool] = {}
        #: backward function -> parameters whose gradient it can write into ``d<param>_out``
        self.outs: dict[str, list[str]] = {}
        #: stem -> the name of its forward function (another stem's, when they read the same)
        self.forward_names: dict[str, str] = {}
        self.forward_sources: dict[tuple, str] = {}  # (type, base stem, source) -> its name
        self.stems = function_stems(self.net)
        self.h_owned = False  # h is a new array that nothing else holds (forward lines)
        self.dh_owned = False  # the same for dh (backward lines)

    # -- layer functions ----------------------------------------------------------------------
    def _render_function(
        self, name, signature, summary, formulas, statements, returns, optional=(), notes=()
    ):
        """One function; ``optional``: targets computed only ``if input_grad``."""
        template = self.env.get_template("function.py.j2")
        lines = [
            wrapped
            for st in statements
            for line in st.lines(st.target in optional)
            for wrapped in wrap_line(line, MAX_LINE - 4)  # the template indents the body
        ]
        return template.render(
            name=name,
            header="\n".join(wrap_line(f"def {name}({signature}):")),
            summary=summary,
            formulas=formulas,
            notes=notes,
            lines=lines,
            returns=returns,
        ).rstrip("\n")

    def _printed(
        self,
        outputs: list[tuple[str, sp.Expr]],
        form: Forward,
        available: list[str],
        returned: set[str] | None = None,
        writable: str | None = None,
        into: set[str] = frozenset(),
        carried: tuple[Carried, ...] = (),
    ) -> list[_Statement]:
        """Statements for named outputs, repeated sub-expressions computed once, in order.

        With ``returned`` (the names the function returns), a big array that nothing reads
        afterwards lends its memory to the next element-wise result computed from it (NumPy's
        ``out=``); so does the argument ``writable`` when the caller passes ``overwrite=True``.
        """
        shapes = _array_shapes(form)
        shapes.update({c.name: tuple(c.array.dims) for c in carried})
        exprs = [spread_factors(accurate_forms(float_constants(e)), shapes) for _, e in outputs]
        named, exprs = _name_windows(exprs)
        outputs = [*named, *outputs]
        exprs = [value for _, value in named] + exprs
        replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("common"), order="none")
        # Trivial "common" values (1/N) read better inline.
        trivial = {s: v for s, v in replacements if sp.count_ops(v) <= 1 and not _has_array(v)}
        kept = [(s, v) for s, v in replacements if s not in trivial]
        renames = {s: sp.Symbol(f"common{i}") for i, (s, _) in enumerate(kept)}
        trivial = {s: v.xreplace(renames) for s, v in trivial.items()}
        renames.update(trivial)
        items = [(str(renames[s]), v.xreplace(renames)) for s, v in kept]
        items += [(t, v.xreplace(renames)) for (t, _), v in zip(outputs, reduced, strict=True)]
        ordered = _dependency_order(items, set(available))
        for target, value in ordered:
            shapes.setdefault(target, array_shape(value, shapes))
        ordered = _place_rows(ordered, shapes)
        printer = SymbpNumPyPrinter(shapes=shapes)
        if returned is None:
            statements = [_Statement(t, printer.doprint(v), fresh=_is_fresh(v)) for t, v in ordered]
        else:
            statements = _reuse_memory(ordered, shapes, returned, writable, printer, into)
        self.helpers |= printer.helpers_used
        sizes, self.unbound = self._size_bindings([v for _, v in ordered], form, available)
        return [_Statement(t, code) for t, code in sizes] + statements

    @staticmethod
    def _size_bindings(exprs, form: Forward, available: list[str]) -> list[tuple[str, str]]:
        """``N = x.shape[0]`` for each symbolic size the expressions use."""
        bindings = []
        free = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
        arrays = {a.name: a for a in form.arrays.values()}
        arrays.update({"d" + s.name: s.array for s in form.stages})
        unbound = []
        for symbol in sorted(free, key=lambda s: s.name):
            if not (symbol.is_integer and symbol.is_positive) or symbol in form.constants:
                continue
            binding = None
            for name in available:
                array = arrays.get(name)
                if array is None:
                    continue
                if symbol in array.dims:
                    binding = f"{name}.shape[{array.dims.index(symbol)}]"
                    break
                # A padded length such as H_in + 2*padding: solve for H_in.
                for axis, dim in enumerate(array.dims):
                    rest = sp.sympify(dim) - symbol
                    if symbol not in rest.free_symbols and rest.free_symbols <= set(form.constants):
                        binding = numpy_code(sp.Symbol(f"{name}.shape[{axis}]") - rest)
                        break
                if binding:
                    break
            if binding:
                bindings.append((symbol.name, binding))
            else:
                unbound.append(symbol.name)
        return bindings, unbound

    def layer_functions(self, stem: str, layer: Layer, derivation: LayerDerivation, eval_form):
        if stem in self.forward_names:
            return
        form = derivation.form
        names = set(form.arrays) | {derivation.upstream.name}
        lowering = Lowering(names, form)

        def keywords(exprs):
            used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
            names = [s.name for s in form.constants if s in used]
            return (", *, " + ", ".join(names)) if names else ""

        # forward (computing the carried values once, for both passes)
        carried = derivation.carried
        kept = {c.expr: c.array[c.indices] for c in carried}
        # a value computed from another carried value comes after it
        computed = sorted(carried, key=lambda c: sum(c.expr.has(o.expr) for o in carried))
        outputs = [
            (c.name, lowering.lower(
                (c.expr if c.computed is None else c.computed).xreplace(_without(kept, c.expr)),
                c.indices))
            for c in computed
        ]
        outputs += [
            (s.name, lowering.lower(stabilize(s.expr).xreplace(kept), s.indices))
            for s in form.stages
        ]
        cached = [array.name for array in derivation.cached]
        args = [a.name for a in form.inputs + form.params + form.aux]
        kw = keywords([e for _, e in outputs])
        returns = f"{form.output.name}, ({', '.join(cached)}{',' if len(cached) == 1 else ''})"
        returned = {form.output.name, *cached}
        if layer.train_returns:  # declared: what the state update reads (batch norm's mu, var)
            returns += f", ({', '.join(layer.train_returns)})"
            returned |= set(layer.train_returns)
        writable = form.inputs[0].name if len(form.inputs) == 1 else None
        writable = writable if writable not in cached else None
        statements = self._printed(outputs, form, args, returned, writable, carried=carried)
        kw = _with_sizes(kw, self.unbound)
        self.size_keywords[f"{stem}_forward"] = self.unbound
        overwrites = any(st.overwrites for st in statements)
        if overwrites:
            kw += (", " if kw else ", *, ") + "overwrite=False"
        self.overwrites[f"{stem}_forward"] = overwrites
        output = next(st for st in statements if st.target == form.output.name)
        self.owned_output[stem] = output.fresh and form.output.name not in cached
        source = self._render_function(
            f"{stem}_forward",
            ", ".join(args) + kw,
            f"Forward pass of {layer.kind}; returns the output and what backward needs.",
            [formula(c.array[c.indices], c.math) for c in computed]
            + [formula(s.array[s.indices], s.expr) for s in form.stages],
            statements,
            returns,
            notes=[OVERWRITE_NOTE.format(name=writable)] if overwrites else [],
        )
        # One layer's math under two stems (a convolution whose input gradient is computed two
        # ways, chosen by its sizes) shares one forward function when the two read the same.
        key = (type(layer), layer.function_stem, source.replace(f"{stem}_forward", "{name}"))
        twin = self.forward_sources.setdefault(key, f"{stem}_forward")
        if twin == f"{stem}_forward":
            self.functions[twin] = _Function(twin, source)
        self.forward_names[stem] = twin

        # backward
        upstream = derivation.upstream.name
        params_read = [p.name for p in derivation.params_read]
        grads = [(f"d{a.name}", derivation.vjp[a.name]) for a in form.differentiable]
        exprs = [computed_form(a.expr, upstream, form.gather) for _, a in grads]
        outputs = [
            (t, lowering.lower(stabilize(e).xreplace(kept), a.indices))
            for (t, a), e in zip(grads, exprs, strict=True)
        ]
        kw = keywords([e for _, e in outputs])
        # A loss is the last node: its upstream gradient is 1 and not an argument.
        given = [upstream] if form.output.array.dims else []
        statements = self._printed(
            outputs,
            form,
            [*given, *cached, *params_read],
            {t for t, _ in grads},
            upstream if given else None,
            {f"d{p.name}" for p in form.params},
            carried=carried,
        )
        kw = _with_sizes(kw, self.unbound)
        self.size_keywords[f"{stem}_backward"] = self.unbound
        signature = ", ".join([*given, *cached, *params_read]) + kw
        optional = ()
        if form.params:
            signature += (", " if kw else ", *, ") + "input_grad=True"
            optional = _only_for({f"d{a.name}" for a in form.inputs}, statements)
        overwrites = any(st.overwrites for st in statements)
        if overwrites:
            signature += (", " if "*" in signature else ", *, ") + "overwrite=False"
        self.overwrites[f"{stem}_backward"] = overwrites
        outs = [st.target for st in statements if st.into]
        for target in outs:
            signature += (", " if "*" in signature else ", *, ") + f"{target}_out=None"
        self.outs[f"{stem}_backward"] = [t[1:] for t in outs]
        notes = [OVERWRITE_NOTE.format(name=upstream)] if overwrites else []
        for (target, adjoint), expr in zip(grads, exprs, strict=True):
            if expr != adjoint.expr:  # computed in the gather form: say what that is
                notes.append(f"{target}: {reading(expr, upstream)}.")
        for c in carried:
            notes.append(f"{formula(c.array[c.indices], c.math)}, kept by the forward pass.")
        if outs:
            notes.append(f"{', '.join(t + '_out' for t in outs)}: {OUT_NOTE}")
        first = f"d{form.differentiable[0].name}"
        self.owned_grad[stem] = any(st.target == first and st.fresh for st in statements)
        self.functions[f"{stem}_backward"] = _Function(
            f"{stem}_backward",
            self._render_function(
                f"{stem}_backward",
                signature,
                f"Backward pass of {layer.kind}, derived by symbp"
                + (f": gradients from {upstream}." if given else ": gradient of the loss."),
                [formula(a.lhs, e) for (_, a), e in zip(grads, exprs, strict=True)],
                statements,
                ", ".join(t for t, _ in grads),
                optional,
                notes,
            ),
        )

        # evaluation mode
        if eval_form is not None:
            low = Lowering(set(eval_form.arrays), eval_form)
            stage = eval_form.output
            outputs = [(stage.name, low.lower(stabilize(stage.expr), stage.indices))]
            eval_constants = [s.name for s in eval_form.constants]
            args = [a.name for a in eval_form.inputs + eval_form.params + eval_form.aux]
            ekw = (", *, " + ", ".join(eval_constants)) if eval_constants else ""
            low.preferred = ()
            self.functions[f"{stem}_predict"] = _Function(
                f"{stem}_predict",
                self._render_function(
                    f"{stem}_predict",
                    ", ".join(args) + ekw,
                    f"Evaluation-mode forward pass of {layer.kind}.",
                    [formula(stage.array[stage.indices], stage.expr)],
                    self._printed(outputs, eval_form, args),
                    stage.name,
                ),
            )

    def state_update_function(self, stem: str, layer: Layer) -> str:
        """``<stem>_running_stats``: the layer's declared state update, printed once."""
        name = f"{stem}_running_stats"
        if name in self.functions:
            return name
        updates = layer.state_updates()
        printer = SymbpNumPyPrinter()
        assignments = [_Statement(f"new_{k}", printer.doprint(v)) for k, v in updates.items()]
        used = {s.name for e in updates.values() for s in e.free_symbols}
        constants = [k for k in layer.constant_values() if k in used]
        signature = ", ".join([*updates, *layer.train_returns, "N"])
        if constants:
            signature += ", *, " + ", ".join(constants)
        self.functions[name] = _Function(
            name,
            self._render_function(
                name,
                signature,
                layer.state_update_doc,
                [f"{k} <- {v}" for k, v in updates.items()],
                assignments,
                ", ".join(st.target for st in assignments),
            ),
        )
        return name


def _without(mapping: dict, key) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _array_shapes(form: Forward) -> dict[str, tuple | None]:
    """Shapes of the arrays a layer's formulas name: its arrays and their gradients."""
    shapes: dict[str, tuple | None] = {}
    for name, array in form.arrays.items():
        shapes[name] = tuple(array.dims)
        shapes["d" + name] = tuple(array.dims)
    return shapes


def spread_factors(expr: sp.Expr, shapes: dict[str, tuple | None]) -> sp.Expr:
    """Multiply small factors into the terms of a big sum when that saves passes over memory.

    ``k*(N*dy - c*xhat - s)`` with per-feature ``k``, ``c``, ``s`` costs five passes over the
    batch (``N*dy``, ``c*xhat``, two subtractions, the product with ``k``); written as
    ``(k*N)*dy - (k*c)*xhat - k*s`` it costs four, and the small products are cheap. It is
    done only when every big term already carries a factor (so no new pass appears); the value
    is the same, exactly.
    """
    if expr.is_Atom or not isinstance(expr, sp.Add | sp.Mul | sp.Pow | sp.Function):
        return expr
    args = [spread_factors(a, shapes) for a in expr.args]
    if args != list(expr.args):
        expr = expr.func(*args)
    if not isinstance(expr, sp.Mul):
        return expr
    shape = array_shape(expr, shapes)
    if shape is None:
        return expr
    small = [f for f in expr.args if is_smaller(f, shape, shapes)]
    big = [f for f in expr.args if f not in small]
    if not small or len(big) != 1 or not isinstance(big[0], sp.Add):
        return expr
    factor, total = sp.Mul(*small), big[0]
    coefficients = [
        sp.Mul(*[f for f in sp.Mul.make_args(term) if is_smaller(f, shape, shapes)])
        for term in total.args
        if not is_smaller(term, shape, shapes)
    ]
    if any(c in (sp.S.One, sp.S.NegativeOne) for c in coefficients):
        return expr  # a bare big term: built up in place from the others (_accumulate)
    for coefficient in coefficients:
        # A coefficient that cannot be zero (a number, a size) is divided out instead:
        # k*(N*dy - c*xhat) = (k*N)*(dy - (c/N)*xhat), which builds up in one array.
        if coefficient.is_number or all(
            f.is_Number or (f.is_Symbol and f.is_integer and f.is_positive)
            for f in sp.Mul.make_args(coefficient)
        ):
            normalized = sp.Add(*[term / coefficient for term in total.args])
            scale = factor * coefficient
            return normalized if scale == 1 else sp.Mul(scale, normalized, evaluate=False)
    return sp.Add(*[factor * term for term in total.args])


def function_stems(net: Net) -> dict[str | None, str]:
    """The stem of each layer's generated functions, by layer name (``None``: the loss).

    One stem per distinct layer math (layers with the same math share their functions). A
    type's own stem (``linear``, ``batchnorm``) goes to that type first; a layer named by the
    user (a custom activation) is called by its name, or ``<name>_<kind>`` when that name is
    another type's stem; two different maths that would share a stem (two unnamed custom
    activations, a layer type on inputs of two ranks) get ``_2``, ``_3``, ... in order.
    """
    entries: list[tuple[str | None, tuple, str, bool]] = []
    for item in net.walk():
        layer = item.layer
        stem = layer.stem_for(item.in_shape)
        identity = (type(layer), layer.math_key(item.in_shape), stem)
        named = layer.name is not None and stem == layer.name != layer.kind
        entries.append((item.name, identity, stem, named))
    if net.loss is not None:
        loss = net.loss
        entries.append((None, (type(loss), loss.kind), loss.function_stem, False))
    by_identity: dict[tuple, str] = {}
    taken: set[str] = set()
    for want_named in (False, True):  # the types' own stems first
        for _, identity, preferred, named in entries:
            if named != want_named or identity in by_identity:
                continue
            stem = preferred
            if stem in taken and named:
                stem = f"{preferred}_{identity[0].kind}"
            count = 1
            base = stem
            while stem in taken:
                count += 1
                stem = f"{base}_{count}"
            by_identity[identity] = stem
            taken.add(stem)
    return {name: by_identity[identity] for name, identity, _, _ in entries}


def _with_sizes(keywords: str, sizes: list[str]) -> str:
    """Keyword-only arguments ``keywords`` plus sizes no argument's shape tells."""
    if not sizes:
        return keywords
    return keywords + (", " if keywords else ", *, ") + ", ".join(sizes)


def _only_for(targets: set[str], statements) -> set[str]:
    """``targets`` and the intermediates that only they read (computed ``if input_grad``)."""
    optional = set(targets)
    changed = True
    while changed:
        changed = False
        for statement in statements:
            if statement.target in optional or re.fullmatch(r"\w+\.shape\[\d+\]", statement.code):
                continue  # sizes are free to read
            word = re.compile(rf"\b{re.escape(statement.target)}\b")
            readers = [other.target for other in statements if word.search(other.code)
                       and other.target != statement.target]
            if readers and all(reader in optional for reader in readers):
                optional.add(statement.target)
                changed = True
    return optional


def _name_windows(exprs: list[sp.Expr]) -> tuple[list[tuple[str, sp.Expr]], list[sp.Expr]]:
    """Name each window view (``x_windows``) and each scattered array (``cols``).

    They are the big intermediates of convolutions and pooling; named, each is computed once and
    the lines that use them stay short enough to read. A matrix product of windows, and the
    scatter of a matrix product, become one node each (``_window_tensordot``,
    ``_col2im_tensordot``): their helpers choose how to compute them for the shapes they get.
    """
    named: dict[sp.Expr, sp.Symbol] = {}

    def name(node: sp.Expr, base: str) -> sp.Symbol:
        if node not in named:
            taken = {str(symbol) for symbol in named.values()}
            text, number = base, 1
            while text in taken:
                number += 1
                text = f"{base}{number}"
            named[node] = sp.Symbol(text, real=True)
        return named[node]

    def padded(array: sp.Expr) -> sp.Expr:
        if isinstance(array, Shifted) and array.args[0].is_Symbol:  # a zero-padded gradient
            return name(array, f"{array.args[0]}_padded")
        return array

    def visit(expr: sp.Expr) -> sp.Expr:
        if not isinstance(expr, sp.Basic) or not expr.has(Windows, Col2Im):
            return expr
        if isinstance(expr, TensorDot) and isinstance(expr.args[1], Windows):
            a, windows, axes_a, axes_windows, order = expr.args
            array, *geometry = windows.args
            return WindowTensorDot(visit(a), padded(visit(array)), *geometry, axes_a,
                                   axes_windows, order)
        if (isinstance(expr, Col2Im) and isinstance(expr.args[0], TensorDot)
                and not expr.args[0].has(Windows)):
            product, *geometry = expr.args
            a, b, *axes = product.args
            return Col2ImTensorDot(visit(a), visit(b), *axes, *geometry)
        routed = _first_max_routing(expr)
        if routed is not None:
            windows, g = routed
            return FirstMaxCol2Im(visit(windows), visit(g), *expr.args[1:])
        expr = expr.func(*[visit(arg) for arg in expr.args])
        if isinstance(expr, Windows):
            expr = expr.func(padded(expr.args[0]), *expr.args[1:])
        if isinstance(expr, Windows) and expr.args[0].is_Symbol:
            return name(expr, f"{expr.args[0]}_windows")
        if isinstance(expr, Col2Im) and not expr.args[0].is_Symbol:
            return expr.func(name(expr.args[0], "cols"), *expr.args[1:])
        return expr

    exprs = [visit(e) for e in exprs]
    return [(str(symbol), node) for node, symbol in named.items()], exprs


def _first_max_routing(expr: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """``(windows, g)`` when ``expr`` is ``Col2Im(FirstArgmaxMask(windows) * g, ...)``."""
    if not isinstance(expr, Col2Im):
        return None
    factors = sp.Mul.make_args(expr.args[0])
    masks = [f for f in factors if isinstance(f, FirstArgmaxMask)]
    if len(masks) != 1 or len(factors) < 2:
        return None
    (mask,) = masks
    return mask.args[0], sp.Mul(*[f for f in factors if f is not mask])


def _has_array(expr: sp.Expr) -> bool:
    return any(not (s.is_integer and s.is_positive) for s in expr.free_symbols)


def _dependency_order(items, defined: set[str]):
    """Assignments in their given order, except that each comes after what it reads."""
    pending = list(items)
    targets = {t for t, _ in items}
    done = set(defined)
    ordered = []
    while pending:
        for position, (target, value) in enumerate(pending):
            needs = {s.name for s in value.free_symbols} & targets
            if needs <= done:
                ordered.append((target, value))
                done.add(target)
                del pending[position]
                break
        else:
            raise ValueError(f"circular assignments: {[t for t, _ in pending]}")
    return ordered


def generate_module(net: Net, derivation: NetworkDerivation | None = None) -> str:
    """The source of the generated module (deterministic: same net, same bytes)."""
    derivation = derivation or derive_network(net)
    builder = ModuleBuilder(derivation)
    plan = build_plan(net, derivation)
    forward = forward_steps(builder, plan)
    backward = backward_steps(builder, plan)
    loss = None
    if net.loss is not None:
        loss_derivation = derivation.loss
        assert loss_derivation is not None
        stem = builder.stems[None]
        builder.layer_functions(stem, net.loss, loss_derivation, None)
        target = (
            "np.eye(out.shape[1], dtype=out.dtype)[y]" if net.loss.target_kind == "labels" else "y"
        )
        loss = dict(
            kind=net.loss.kind,
            forward=f"{stem}_forward",
            backward=f"{stem}_backward",
            target=target,
            classes=net.output_shape[0] if net.loss.target_kind == "labels" else None,
        )
    summary = [f"{item.name}: {item.layer.describe()}" for item in derivation.layers]
    if net.loss is not None:
        summary.append(f"loss: {net.loss.kind}")
    if builder.helpers & PARTED_HELPERS:
        builder.helpers.add("parts")
    imports = sorted(
        ({"math"} if builder.helpers & {"banded", "tensordot"} else set())
        | ({"concurrent.futures"} if "parts" in builder.helpers else set())
    )
    template = builder.env.get_template("module.py.j2")
    source = template.render(
        threads="parts" in builder.helpers,
        net=net,
        version=__version__,
        summary=summary,
        imports=imports,
        param_shapes={k: tuple(v) for k, v in net.param_shapes.items()},
        state_shapes={k: tuple(v) for k, v in net.state_shapes.items()},
        input_shape=tuple(net.input_shape),
        output_shape=tuple(net.output_shape),
        helpers=[_helper_source(builder.env, name) for name in sorted(builder.helpers)],
        inits=inits(plan),
        functions=[f.source for f in builder.functions.values()],
        uses_rng=builder.uses_rng,
        uses_state=builder.uses_state,
        forward_steps=forward,
        backward_steps=backward,
        loss=loss,
    )
    return source


def _helper_source(env: jinja2.Environment, name: str) -> str:
    return env.get_template("helpers.py.j2").module.__getattribute__(name)().rstrip("\n")
