"""Prove derived formulas exact by an independent route: scalar expansion at small sizes.

For concrete sizes (:func:`default_sizes`: the smallest at which every index case occurs) every
array element becomes its own sympy symbol, every sum an explicit addition, and every stage a
plain scalar expression of the inputs. The loss-side contraction ``L = sum_p dy[p] * y[p]`` is
then differentiated *directly* with sympy's scalar ``diff`` -- each output element ``y[p]`` by
each element it contains, accumulated per element (by linearity the same as ``diff`` of ``L``):
no index algebra, no delta elimination, no rewriting. The engine's formula, expanded the same
way, must equal it element by element: the difference must be proved 0.

The proof of 0 is exact throughout. It first tries the difference as a polynomial over the
rationals (:func:`_polynomial_zero`: elements, and function values and roots taken as variables
of their own; zero there is zero for every value, so for the true ones), which settles batch
norm's roots without sympy cancelling rational functions of long sums; then sympy's
``expand``, ``cancel`` and ``simplify``. Random points only ever *refute* (a quick
``_numerically_nonzero``); they never prove.

Where a formula has kinks (``Max``, ``Heaviside``, ``Piecewise``), the proof is done branch by
branch: each element that appears in a kink condition is taken positive, negative and zero.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import sympy as sp

from ..declare.forms import Array, FirstArgmax, Forward, N, WindowMax
from .kinks import differentiate
from .layer import Adjoint, LayerDerivation, adjoint_array

MAX_BRANCH_SYMBOLS = 6


@dataclass
class Verdict:
    """The outcome for one formula at one set of sizes."""

    name: str
    sizes: dict[str, int]
    proven: bool
    detail: str = ""


class _Expander:
    """Turns index expressions into scalar expressions at concrete sizes."""

    def __init__(self, sizes: dict[sp.Symbol, int]):
        self.sizes = sizes
        self.tables: dict[str, dict[tuple[int, ...], sp.Expr]] = {}
        self.ordering: dict[sp.Symbol, sp.Expr] = {}
        self._compiled: dict[sp.Expr, object] = {}

    def symbols_for(self, array: Array, prefix: str = "", ordered: bool = False) -> None:
        """A symbol per element; ``ordered``: ``t + k`` with distinct integers k, so that
        comparisons between elements (a max-pooling window's arg-max) are decided."""
        table = {}
        positions = list(_positions(array, self.sizes))
        ranks = list(range(len(positions)))
        random.Random(len(positions)).shuffle(ranks)
        base = sp.Symbol("t", real=True)
        for rank, position in zip(ranks, positions, strict=True):
            label = "_".join([prefix + array.name, *map(str, position)])
            table[position] = sp.Symbol(label, real=True, positive=array.positive or None)
            if ordered:  # compared (and finally evaluated) at t + rank
                self.ordering[table[position]] = base + rank
        self.tables[prefix + array.name] = table

    def expand(self, expr: sp.Expr, binding: dict[sp.Symbol, int]) -> sp.Expr:
        if isinstance(expr, sp.Sum):
            return self._expand_sum(expr, binding)
        if isinstance(expr, sp.Indexed):
            position = tuple(self._integer(i, binding) for i in expr.indices)
            # Outside its range an array reads 0 (zero padding, windows at the border).
            return self.tables[expr.base.name].get(position, sp.Integer(0))
        if isinstance(expr, sp.KroneckerDelta):
            same = self._integer(expr.args[0], binding) == self._integer(expr.args[1], binding)
            return sp.Integer(1 if same else 0)
        if isinstance(expr, sp.Mul):
            # Structural zeros first (a delta off its diagonal, an element outside its array):
            # the rest of the product is then never built.
            factors = sorted(expr.args, key=lambda a: not isinstance(a, _STRUCTURAL))
            values = []
            for factor in factors:
                value = self.expand(factor, binding)
                if value == 0 and isinstance(factor, _STRUCTURAL):
                    return sp.Integer(0)
                values.append(value)
            return sp.Mul(*values)
        if isinstance(expr, WindowMax):
            return sp.Max(*self._window_values(expr, binding))
        if isinstance(expr, FirstArgmax):
            window, point = expr.args[0], expr.args[1:]
            values = [v.xreplace(self.ordering) for v in self._window_values(window, binding)]
            best = max(range(len(values)), key=lambda k: (values[k] - values[0], -k))
            offsets = list(itertools.product(*[range(r) for r in self._ranges(window, binding)]))
            here = tuple(self._integer(p, binding) for p in point)
            return sp.Integer(1 if offsets[best] == here else 0)
        if isinstance(expr, sp.Symbol):
            if expr in binding:
                return sp.Integer(binding[expr])
            if expr in self.sizes:
                return sp.Integer(self.sizes[expr])
            if expr.name in self.tables and () in self.tables[expr.name]:
                return self.tables[expr.name][()]
            return expr
        if not expr.args:
            return expr
        return expr.func(*[self.expand(arg, binding) for arg in expr.args])


    def _expand_sum(self, expr: sp.Sum, binding: dict[sp.Symbol, int]) -> sp.Expr:
        """The sum written out term by term. A factor that can be zero structurally (a delta,
        an element read outside its array) is tested as soon as the summation indices it uses
        are bound, and a zero one skips the loops inside it: the terms it skips are zero."""
        body, limits = expr.function, expr.limits
        ranges = [
            (index, range(self._integer(low, binding), self._integer(high, binding) + 1))
            for index, low, high in limits
        ]
        order = {index: level for level, (index, _) in enumerate(ranges)}
        guards: list[list[sp.Expr]] = [[] for _ in ranges]
        for factor in sp.Mul.make_args(body):
            if isinstance(factor, _STRUCTURAL):
                levels = [order[s] for s in factor.free_symbols if s in order]
                if levels:
                    guards[max(levels)].append(factor)
        terms: list[sp.Expr] = []

        def loop(level: int, inner: dict[sp.Symbol, int]) -> None:
            if level == len(ranges):
                terms.append(self.expand(body, inner))
                return
            index, values = ranges[level]
            for value in values:
                inner[index] = value
                if all(self._nonzero(guard, inner) for guard in guards[level]):
                    loop(level + 1, inner)
            del inner[index]

        loop(0, dict(binding))
        return sp.Add(*terms)

    def _nonzero(self, factor: sp.Expr, binding: dict[sp.Symbol, int]) -> bool:
        """Whether a delta or an element read is possibly nonzero (inside its array)."""
        if isinstance(factor, sp.KroneckerDelta):
            left, right = factor.args
            return self._integer(left, binding) == self._integer(right, binding)
        table = self.tables.get(factor.base.name)
        if table is None:
            return True
        return tuple(self._integer(i, binding) for i in factor.indices) in table

    def _integer(self, expr, binding) -> int:
        """An index expression's value; compiled once per expression (this runs millions of
        times: an element of a convolution's gradient reads hundreds of index expressions)."""
        if isinstance(expr, sp.Indexed):  # an id, read from the integer array's given values
            return int(self.expand(expr, binding))
        compiled = self._compiled.get(expr)
        if compiled is None:
            fixed = {k: sp.Integer(v) for k, v in self.sizes.items()}
            compiled = self._compiled[expr] = _compile_integer(sp.sympify(expr).xreplace(fixed))
        value = compiled(binding)
        if value != int(value):
            raise ValueError(f"index {expr} is not an integer at {binding}: {value}")
        return int(value)

    def _ranges(self, window, binding):
        return [self._integer(high - low + 1, binding) for _, low, high in window.limits]

    def _window_values(self, window, binding):
        values = []
        for offsets in itertools.product(*[range(r) for r in self._ranges(window, binding)]):
            inner = dict(binding)
            inner.update(zip(window.variables, offsets, strict=True))
            values.append(self.expand(window.function, inner))
        return values


_STRUCTURAL = (sp.KroneckerDelta, sp.Indexed)


def _compile_integer(expr: sp.Expr):
    """``binding -> number`` for an index expression with only index symbols left free: sums and
    products of integers and symbols are evaluated in Python; anything else through sympy."""
    if expr.is_Rational:
        value = Fraction(int(expr.p), int(expr.q)) if expr.q != 1 else int(expr)
        return lambda binding: value
    if expr.is_Symbol:
        return lambda binding: binding[expr]
    if expr.is_Add or expr.is_Mul:
        parts = [_compile_integer(arg) for arg in expr.args]
        if expr.is_Add:
            return lambda binding: sum(part(binding) for part in parts)

        def product(binding):
            result = 1
            for part in parts:
                result *= part(binding)
            return result

        return product

    def general(binding):
        value = expr.xreplace({k: sp.Integer(v) for k, v in binding.items()})
        if not value.is_Rational:
            raise ValueError(f"index {expr} is not a number at {binding}: {value}")
        return Fraction(int(value.p), int(value.q))

    return general


def _positions(array: Array, sizes: dict[sp.Symbol, int]):
    shape = [int(sp.sympify(d).xreplace(sizes)) for d in array.dims]
    return itertools.product(*[range(s) for s in shape])


def expand_forward(form: Forward, sizes: dict[sp.Symbol, int], ids=None) -> _Expander:
    """Symbols for the inputs, parameters and auxiliaries; stage values as their expressions.
    An integer input (ids) takes its values from ``ids``: name -> values in C order."""
    expander = _Expander(sizes)
    ordered = any(stage.expr.has(WindowMax) for stage in form.stages)
    for array in form.inputs + form.params + form.aux:
        if array.integer:
            values = iter((ids or {})[array.name])
            expander.tables[array.name] = {p: sp.Integer(next(values))
                                           for p in _positions(array, sizes)}
            continue
        expander.symbols_for(array, ordered=ordered and array in form.inputs)
    for stage in form.stages:
        table = {}
        for position in _positions(stage.array, sizes):
            binding = dict(zip(stage.indices, position, strict=True))
            table[position] = expander.expand(stage.expr, binding)
        expander.tables[stage.name] = table
    upstream = adjoint_array(form.output.array)
    if form.output.array.dims:
        expander.symbols_for(upstream)
    else:
        expander.tables[upstream.name] = {(): sp.Integer(1)}
    return expander


def verify_layer(
    derivation: LayerDerivation,
    sizes: dict[sp.Symbol, int],
    *,
    staged: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Verdict]:
    """Check every VJP (compact, or with ``staged`` the staged chain) against direct ``diff``.

    The direct side is ``dL/de = sum_p dy[p] * d y[p] / d e`` for ``L = sum_p dy[p] * y[p]``,
    every output element ``y[p]`` a scalar expression of the input, parameter and auxiliary
    elements ``e``: sympy's ``diff`` of each ``y[p]`` by each element it contains (the same
    derivative as ``diff`` of the whole contraction, by linearity, without differentiating a
    sum of every output for each element). ``progress(what, done, total)`` is called as the
    elements are compared.

    Integer inputs (an embedding's ids, which read a table's rows) are not symbols: the proof
    is made for each of their assignments (:func:`id_assignments`), and holds where all hold."""
    form = derivation.form
    assignments = id_assignments(form, sizes)
    if assignments:
        verdicts = [_verify_at(derivation, sizes, staged, progress, ids) for ids in assignments]
        return [
            next((v for v in per_formula if not v.proven), per_formula[0])
            for per_formula in zip(*verdicts, strict=True)
        ]
    return _verify_at(derivation, sizes, staged, progress, None)


#: the most assignments of the ids :func:`verify_layer` proves a layer at
MAX_ID_ASSIGNMENTS = 64


def id_assignments(form: Forward, sizes: dict[sp.Symbol, int]) -> list[dict[str, list[int]]]:
    """Values for the form's integer inputs: every assignment of ids in ``[0, rows)`` (``rows``
    the first size of the array they index) where there are at most
    :data:`MAX_ID_ASSIGNMENTS`, else that many drawn with a fixed seed, the ids all equal and
    all different (as far as the rows allow) among them."""
    integer = [a for a in form.inputs if a.integer]
    if not integer:
        return []
    slots, ranges = [], []
    for array in integer:
        count = len(list(_positions(array, sizes)))
        read = next(e for s in form.stages for e in s.expr.atoms(sp.Indexed)
                    if e.indices and isinstance(e.indices[0], sp.Indexed)
                    and e.indices[0].base == array.base)
        rows = int(sp.sympify(form.arrays[read.base.name].dims[0]).xreplace(sizes))
        slots.append((array.name, count))
        ranges += [range(rows)] * count
    total = 1
    for values in ranges:
        total *= len(values)
    if total <= MAX_ID_ASSIGNMENTS:
        flat = list(itertools.product(*ranges))
    else:
        draw = random.Random(0)
        flat = [tuple(0 for _ in ranges), tuple(k % len(r) for k, r in enumerate(ranges))]
        flat += [tuple(draw.choice(r) for r in ranges) for _ in range(MAX_ID_ASSIGNMENTS - 2)]
    result = []
    for values in flat:
        assignment, start = {}, 0
        for name, count in slots:
            assignment[name], start = list(values[start : start + count]), start + count
        result.append(assignment)
    return result


def _verify_at(derivation, sizes, staged, progress, ids) -> list[Verdict]:
    form = derivation.form
    expander = expand_forward(form, sizes, ids)
    adjoints: dict[str, Adjoint]
    if staged:
        for adjoint in derivation.staged:  # in computation order
            _table_of(expander, adjoint, sizes)
        adjoints = {a.array.name: a for a in derivation.staged}
    else:
        for adjoint in derivation.through.values():  # read by name by the others
            _table_of(expander, adjoint, sizes)
        adjoints = derivation.vjp
    expected = _direct_gradients(expander, form)
    verdicts = []
    named_sizes = {str(k): v for k, v in sizes.items()}
    for array in form.differentiable:
        adjoint = adjoints[array.name]
        table = _table_of(expander, adjoint, sizes)
        failures = []
        for done, (position, value) in enumerate(table.items()):
            if progress is not None:
                progress(adjoint.name, done, len(table))
            element = expander.tables[array.name][position]
            if not is_zero((expected.get(element, 0) - value).xreplace(expander.ordering)):
                failures.append(position)
        detail = "" if not failures else f"differs at {failures[:3]}"
        verdicts.append(Verdict(adjoint.name, named_sizes, not failures, detail))
    return verdicts


def _direct_gradients(expander: _Expander, form: Forward) -> dict[sp.Symbol, sp.Expr]:
    """``dL/de`` for every element symbol ``e`` of the differentiable arrays, by sympy's scalar
    ``diff`` of each output element (with the engine's convention for the value at a kink)."""
    output = form.output
    upstream = expander.tables[adjoint_array(output.array).name]
    wanted = {
        symbol
        for array in form.differentiable
        for symbol in expander.tables[array.name].values()
    }
    terms: dict[sp.Symbol, list[sp.Expr]] = {}
    for position, value in expander.tables[output.name].items():
        kinked = value.has(*_KINKED)
        for element in value.free_symbols & wanted:
            # The value at a kink is a convention, the same one the engine applies.
            derivative = differentiate(value, element) if kinked else sp.diff(value, element)
            terms.setdefault(element, []).append(upstream[position] * derivative)
    return {element: sp.Add(*parts) for element, parts in terms.items()}


def _table_of(expander: _Expander, adjoint: Adjoint, sizes) -> dict:
    table = {}
    for position in _positions(adjoint.array, sizes):
        binding = dict(zip(adjoint.indices, position, strict=True))
        table[position] = expander.expand(adjoint.expr, binding)
    expander.tables[adjoint.name] = table
    return table


# -- proving a scalar expression zero ---------------------------------------------------------
_KINKED = (sp.Heaviside, sp.Max, sp.Min, sp.Piecewise, sp.sign, sp.Abs)


def is_zero(expr: sp.Expr) -> bool:
    """True only if ``expr`` is proven identically zero (branch by branch at kinks)."""
    expr = sp.sympify(expr)
    kink_symbols = sorted(_kink_symbols(expr), key=sp.default_sort_key)
    if kink_symbols and len(kink_symbols) <= MAX_BRANCH_SYMBOLS:
        for signs in itertools.product((1, -1, 0), repeat=len(kink_symbols)):
            cases = {}
            for symbol, sign in zip(kink_symbols, signs, strict=True):
                if sign == 0:
                    cases[symbol] = sp.Integer(0)
                else:
                    cases[symbol] = sp.Symbol(symbol.name, positive=sign > 0, negative=sign < 0)
            if not _smooth_zero(expr.xreplace(cases)):
                return False
        return True
    return _smooth_zero(expr)


def _kink_symbols(expr: sp.Expr) -> set[sp.Symbol]:
    found: set[sp.Symbol] = set()
    for node in expr.atoms(*_KINKED):
        found |= node.free_symbols
    return found


def _smooth_zero(expr: sp.Expr) -> bool:
    if expr == 0:
        return True
    # Exact and cheap first: the expression as a polynomial in its elements and in its other
    # parts taken as variables of their own (below); zero there is zero here.
    if _polynomial_zero(expr):
        return True
    if _numerically_nonzero(expr):
        return False
    expanded = sp.expand(expr)
    if expanded == 0:
        return True
    together = sp.cancel(sp.together(expanded))
    if together == 0:
        return True
    return sp.simplify(together) == 0


class _NotPolynomial(Exception):
    pass


def _polynomial_zero(expr: sp.Expr) -> bool:
    """Whether ``expr`` is zero as a polynomial with rational coefficients in its symbols and in
    *generalized variables*: each function value (``exp(x_0)``, ``Heaviside(x_1, 0)``) and each
    power ``B**(k/q)`` that is not a positive integer power (batch norm's
    ``(eps + var)**(-1/2)`` and ``**(-3/2)``) becomes ``g**|k|`` for a variable ``g``
    standing for ``B**(+-1/q)``, one per distinct function value or root.

    Zero there proves ``expr`` zero: the polynomial vanishes for every value of its variables,
    so also where each generalized variable takes the value it stands for. Nothing is lost in
    that direction; the converse can fail (``g**2`` against ``B``, ``exp(a)*exp(-a)``), and
    then this says False and the caller goes on with sympy's own cancellation. The arithmetic
    is sympy's sparse polynomial ring (exact rationals), far cheaper than ``expand`` on
    expressions: batch norm's proof on images would spend minutes there."""
    generals: dict[tuple, sp.Dummy] = {}

    def atom(key, make):
        if key not in generals:
            generals[key] = make()
        return generals[key]

    def convert(node):
        """``node`` as a nested structure of ``('+'|'*'|'^', ...)`` over rationals and atoms."""
        if node.is_Rational:
            return node
        if node.is_Float:
            return sp.Rational(node)  # the float's exact binary value, on both sides alike
        if node.is_Symbol:
            return node
        if node.is_Add or node.is_Mul:
            return (node.func, [convert(arg) for arg in node.args])
        if node.is_Pow and node.exp.is_Rational:
            if node.exp.is_Integer and node.exp > 0:
                return (sp.Pow, [convert(node.base), int(node.exp)])
            sign = 1 if node.exp > 0 else -1
            general = atom(("root", node.base, sign, int(node.exp.q)), lambda: sp.Dummy("g"))
            return (sp.Pow, [general, abs(int(node.exp.p))])
        if isinstance(node, (sp.Function, sp.Pow, sp.Max, sp.Min)) or node.is_NumberSymbol:
            return atom(("value", node), lambda: sp.Dummy("g"))
        raise _NotPolynomial(node)

    try:
        tree = convert(expr)
    except _NotPolynomial:
        return False
    symbols = sorted(expr.free_symbols - set(generals.values()), key=sp.default_sort_key)
    gens = symbols + list(generals.values())
    if not gens:
        return False
    ring, *variables = sp.polys.rings.ring(gens, sp.QQ)
    by_symbol = dict(zip(gens, variables, strict=True))

    def evaluate(tree):
        if isinstance(tree, tuple):
            func, args = tree
            if func is sp.Pow:
                return evaluate(args[0]) ** args[1]
            values = [evaluate(arg) for arg in args]
            result = values[0]
            for value in values[1:]:
                result = result + value if func is sp.Add else result * value
            return result
        if tree.is_Rational:
            return ring(sp.QQ(int(tree.p), int(tree.q)))
        return by_symbol[tree]

    return evaluate(tree) == 0


def _numerically_nonzero(expr: sp.Expr, trials: int = 3) -> bool:
    """A quick refutation: clearly nonzero at random points (consistent with assumptions)."""
    rng = random.Random(0)
    symbols = sorted(expr.free_symbols, key=sp.default_sort_key)
    for _ in range(trials):
        values = {}
        for s in symbols:
            magnitude = rng.uniform(0.3, 1.7)
            values[s] = (
                -magnitude
                if s.is_negative
                else magnitude
                if (s.is_positive or rng.random() < 0.5)
                else -magnitude
            )
        try:
            value = complex(expr.xreplace(values).evalf(30))
        except (TypeError, ValueError):
            return False
        if abs(value) > 1e-12:
            return True
    return False


#: Structural constants, each at a value that makes its own index cases: a stride of 2 skips
#: positions (an input row that no window starts at, one that two windows share or none reads),
#: a padding of 1 puts windows across both borders, a dilation of 2 spaces a window's taps.
STRUCTURE = {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}
#: Kernel extents: two, and different, so that a formula that confuses K_h with K_w is caught;
#: with padding 1, a kernel of 2 is a window that always reaches into the input and a kernel of 3
#: one whose full convolution reads the upstream gradient outside its range at both ends.
KERNEL = {"K_h": 2, "K_w": 3}
#: Image extents of a layer that reads windows: different from each other, from the batch and
#: from the channel counts; 5 rows with a stride of 2 and no padding leave the last row unread.
WINDOWED_IMAGE = {"H_in": 5, "W_in": 6}


def proof_batches(form: Forward) -> tuple[int, ...]:
    """The batch sizes ``symbp derive --verify`` proves a layer at (see :func:`default_sizes`).

    Two for layers whose samples interact (batch norm, the losses, a parameter summed over the
    batch), so that the batch size is seen to enter only as it should; one for element-wise
    layers (every element on its own), for layers that read windows (samples enter only
    through the parameter gradients' sum over the batch, which two samples exercise) and for
    forms without a batch (weight decay's term on a weight)."""
    if form.elementwise or form.window_dims or not any(N in a.dims for a in form.arrays.values()):
        return (2,)
    return (2, 3)


def default_sizes(form: Forward, batch: int = 2, width: int = 2) -> dict[sp.Symbol, int]:
    """Small concrete sizes for every symbolic size (and structural constant) the form uses.

    Why small sizes prove the same thing as large ones: a layer's forward and derived formulas
    are written once in the symbolic sizes; each element of a gradient is a sum, over index
    ranges given by the sizes, of one body. What a concrete size can change is only *which case*
    an index falls in: inside or outside an array (padding, windows at a border), a delta met or
    not (stride), one term or several in a sum. So the sizes are the smallest at which every such
    case occurs -- see :data:`STRUCTURE`, :data:`KERNEL`, :data:`WINDOWED_IMAGE` -- and at which
    the sizes differ from each other, so that a formula that reads one size for another, or an
    axis for another, gives a different value and fails:

    * feature widths alternate 2 and 3 (``width`` and ``width + 1``), and a batch of 2 or 3;
    * batch norm on images reduces over ``(N, H, W)`` per channel: at batch 2 the image is
      3 x 2 (every reduced axis has two or more terms, H differs from N and W), at batch 3 it is
      1 x 2 (N, H and W pairwise different); larger images add terms of the same body only, and
      the cost of the expansion grows with the cube of the number reduced over.
    """
    sizes: dict[sp.Symbol, int] = {}
    for symbol in form.constants:
        if symbol.is_integer:  # stride, padding, dilation: structure, so concrete here
            sizes[symbol] = STRUCTURE.get(symbol.name, 1)
    for symbol in form.window_dims:
        sizes[symbol] = KERNEL.get(symbol.name, 2)
    image = WINDOWED_IMAGE if form.window_dims else (
        {"H_in": 3, "W_in": 2} if batch < 3 else {"H_in": 1, "W_in": 2}
    )
    for array in form.arrays.values():
        for dim in array.dims:
            for symbol in sp.sympify(dim).free_symbols:
                if symbol in sizes or symbol in form.size_rules:
                    continue
                if symbol.name == "N":
                    sizes[symbol] = batch
                elif symbol in form.window_dims:
                    sizes[symbol] = KERNEL.get(symbol.name, 2)
                elif symbol.name in image:
                    sizes[symbol] = image[symbol.name]
                else:
                    sizes[symbol] = width + (len(sizes) + 1) % 2
    for symbol in form.constants:
        if symbol.name == "groups":  # channels in groups (group norm): two groups of two
            for size in sizes:
                if size.name == "C":
                    sizes[size] = 2 * sizes[symbol]
    sizes.update({s: v for s, v in form.proof_sizes.items() if s in sizes})  # declared
    for symbol, rule in form.size_rules.items():
        sizes[symbol] = int(rule.xreplace(sizes))
    return sizes
