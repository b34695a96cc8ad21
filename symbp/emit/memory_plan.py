"""Memory planning inside a generated function: which array a result may be computed in.

A big array that nothing reads after a statement lends its memory to the next element-wise
result computed from it (NumPy's ``out=``), an argument the caller marks ``overwrite=True``
likewise, and a parameter gradient may be written into the array the caller hands in
(``d<param>_out``). :class:`_Statement` records, per assignment, whether its value is a new
array nobody else holds (``fresh``), which the network bodies use to pass ``overwrite=True`` on
(:mod:`symbp.emit.network`). Sums of several big terms are built up in one array
(:func:`_accumulate`), vectors broadcast along rows go through ``_along_rows``, and small
factors are multiplied into big sums where that saves a pass (:func:`spread_factors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy as sp

from ..derivation.array_ops import (
    Dot,
    Flipped,
    MaxOver,
    NewAxis,
    Permute,
    Reshape,
    Shifted,
    Step,
    SumOver,
    TensorDot,
    Windows,
    is_array_op,
)
from .array_shapes import array_shape, is_smaller
from .layout import MAX_LINE
from .numpy_printer import RowVector
from .windows import WindowTensorDot


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
        line = f"{self.target} = {self.code} if input_grad else None"
        if not self.extra and self.call is None and 4 + len(line.splitlines()[-1]) <= MAX_LINE:
            return [line]
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
#: Node types NumPy computes as a view of their argument (axes moved, inserted, cut or flipped;
#: a reshape of a contiguous array): never a donor unless their argument is a new array.
_VIEWS = (Permute, NewAxis, Shifted, Flipped, Reshape)


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
    # what each value that is not a new array may be a view of (``dy_2 = dy[:, :, None]``):
    # reading it later reads those arrays' memory, so none of them may be a donor before
    views: dict[str, set[str]] = {}
    for target, value in ordered:
        if isinstance(value, sp.Symbol | Windows) or (
            isinstance(value, _VIEWS) and not _is_fresh(value)
        ):
            views[target] = set().union(
                *[{s.name, *views.get(s.name, ())} for s in value.free_symbols]
            )
    for position, (target, value) in enumerate(ordered):
        later = set().union(*[v.free_symbols for _, v in ordered[position + 1 :]])
        later_names = {s.name for s in later} | returned
        later_names |= set().union(*[views.get(name, set()) for name in later_names])
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
        chained = getattr(printer, "chained_pass", None)  # a target's own in-place passes
        for donor in [*donors, None] if chained is not None else []:
            chain = chained(value, donor)
            if chain is not None:
                start, updates, call = chain
                statement = _Statement(target, start, [target + u for u in updates], call=call)
                break
        if statement is None and target in into and isinstance(value, Dot):
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
        # (the rest may read the donor through a reduction, computed before the call writes:
        # softmax's ``exp_x *= (1/exp_x.sum(axis=1))[:, None]``)
        if factors.count(donor) != 1 or any(
            _read_whole(f, donor) for f in factors if f != donor
        ):
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


def _read_whole(expr: sp.Expr, donor: sp.Symbol) -> bool:
    """Whether ``expr`` reads ``donor`` other than through a sum or a maximum of it."""
    reduced = expr.replace(lambda node: isinstance(node, SumOver | MaxOver) and node.has(donor),
                           lambda node: sp.Dummy())
    return reduced.has(donor)


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
        if is_array_op(expr):
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
