"""From index notation to whole-array form.

``dx[n, i] = Sum_k dz[n, k] W[i, k]`` becomes ``dz @ W.T``; ``dgamma[j] = Sum_m dy[m, j]
xhat[m, j]`` becomes ``sum(dy * xhat, axis 0)``. The whole-array form is a sympy expression over
array-valued symbols and the small set of array operations below (printing-only functions: they
are never differentiated), so that the NumPy and LaTeX printers can both print it, and sympy's
``cse`` can share sub-expressions across a layer's formulas.

:func:`stabilize` applies exact rewrites that make the printed code safe for large inputs
(``log(1 + exp(u))`` -> ``softplus(u)``, rational functions of ``exp(u)`` -> ``sigmoid(u)``,
``log(sum(exp))`` -> a max-shifted log-sum-exp); they change how a value is computed, never the
value.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

from ..errors import DerivationError


class ArrayOp(sp.Function):
    """Base of the array operations; they are printed, never differentiated or evaluated."""

    is_real = True

    def fdiff(self, argindex=1):  # pragma: no cover - guard
        raise DerivationError(f"{type(self).__name__} is a printing node; it has no derivative")


class Dot(ArrayOp):
    """``a @ b``."""

    nargs = 2


class Permute(ArrayOp):
    """``a.T`` (2-D) or an axis permutation ``(a, perm)``."""


class SumOver(ArrayOp):
    """``a.sum(axis=axes)``; ``axes`` is a Tuple of integers."""

    nargs = 2


class MaxOver(ArrayOp):
    """``a.max(axis=axes)``."""

    nargs = 2


class NewAxis(ArrayOp):
    """``a`` with length-1 axes inserted at the given positions (``a[:, None]``)."""

    nargs = 2


class Sigmoid(ArrayOp):
    """``1 / (1 + exp(-u))``, printed in a form that does not overflow."""

    nargs = 1


class Softplus(ArrayOp):
    """``log(1 + exp(u))``, printed in a form that does not overflow."""

    nargs = 1


class Step(ArrayOp):
    """``1`` where ``u > 0`` else ``0``: ``Heaviside(u, 0)``, the kink convention applied."""

    nargs = 1


Axes = tuple[sp.Symbol, ...]


class Lowering:
    """Lower index expressions; ``scalars`` are symbols that stay scalars (sizes, constants)."""

    def __init__(self, array_names: set[str]):
        self.array_names = array_names
        self.preferred: Axes = ()
        self.symbols: dict[str, sp.Symbol] = {}

    def symbol(self, name: str) -> sp.Symbol:
        if name not in self.symbols:
            self.symbols[name] = sp.Symbol(name, real=True)
        return self.symbols[name]

    def lower(self, expr: sp.Expr, axes: Sequence[sp.Symbol]) -> sp.Expr:
        """``expr`` as a whole-array expression whose axes are ``axes``, in that order."""
        self.preferred = tuple(axes)
        array, have = self._lower(expr)
        if set(have) - set(axes):
            raise DerivationError(f"{expr} has free indices {have} beyond {tuple(axes)}")
        return align(array, have, tuple(axes), full=True)

    # -- recursive lowering -------------------------------------------------------------------
    def _lower(self, expr: sp.Expr) -> tuple[sp.Expr, Axes]:
        if isinstance(expr, sp.Indexed):
            indices = tuple(expr.indices)
            if len(set(indices)) != len(indices) or not all(i.is_Symbol for i in indices):
                raise DerivationError(f"cannot lower the element {expr} to a whole array")
            return self.symbol(expr.base.name), indices
        if isinstance(expr, sp.Symbol):
            if expr.name in self.array_names:
                return self.symbol(expr.name), ()
            return expr, ()
        if expr.is_Number or isinstance(expr, sp.NumberSymbol):
            return expr, ()
        if isinstance(expr, sp.Sum):
            return self._lower_sum(expr)
        if isinstance(expr, sp.KroneckerDelta):
            raise DerivationError(f"a Kronecker delta survived elimination: {expr}")
        if isinstance(expr, sp.Heaviside):
            array, have = self._lower(expr.args[0])
            return Step(array), have
        if isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum):
            lse = self._log_sum_exp(expr.args[0])
            if lse is not None:
                return lse
        if isinstance(expr, sp.Mul):
            coefficient, rest = expr.as_coeff_Mul()
            if coefficient != 1 and rest != 1:
                array, have = self._lower(rest)
                return coefficient * array, have
        if isinstance(expr, sp.Piecewise):
            return self._elementwise(
                expr, [a for pair in expr.args for a in pair], lambda *a: _piecewise(a)
            )
        if isinstance(expr, sp.Add | sp.Mul | sp.Pow | sp.Function | sp.Rel | sp.Max | sp.Min):
            return self._elementwise(expr, list(expr.args), lambda *a: expr.func(*a))
        if expr in (sp.true, sp.false):
            return expr, ()
        raise DerivationError(f"cannot lower {expr!r} ({type(expr).__name__})")

    def _elementwise(self, expr, args, build):
        lowered = [self._lower(a) for a in args]
        target = union_axes([have for _, have in lowered])
        aligned = [align(array, have, target) for array, have in lowered]
        return build(*aligned), target

    def _lower_sum(self, expr: sp.Sum) -> tuple[sp.Expr, Axes]:
        bound = [limit[0] for limit in expr.limits]
        contraction = self._contraction(expr.function, bound)
        if contraction is not None:
            return contraction
        array, have = self._lower(expr.function)
        positions = tuple(have.index(b) for b in bound if b in have)
        if len(positions) != len(bound):
            raise DerivationError(f"a bound index does not occur in the summand of {expr}")
        result_axes = tuple(a for a in have if a not in bound)
        return SumOver(array, sp.Tuple(*sorted(positions))), result_axes

    def _contraction(self, body: sp.Expr, bound: list[sp.Symbol]):
        """``Sum_k A[i, k] B[k, j]`` (either operand 1-D or 2-D, any orientation) as ``@``."""
        if len(bound) != 1:
            return None
        (k,) = bound
        outside, inside = [], []
        for factor in sp.Mul.make_args(body):
            (inside if k in factor.free_symbols else outside).append(factor)
        if len(inside) != 2 or not all(isinstance(f, sp.Indexed) for f in inside):
            return None
        lowered = [self._lower(f) for f in inside]
        if any(len(have) > 2 for _, have in lowered):
            return None
        options = [self._oriented(k, *lowered), self._oriented(k, *reversed(lowered))]
        options = [o for o in options if o is not None]
        if not options:
            return None
        _, product, axes = min(options, key=lambda option: option[0])
        if outside:
            rest, rest_axes = self._lower(sp.Mul(*outside))
            target = union_axes([axes, rest_axes])
            product = align(product, axes, target) * align(rest, rest_axes, target)
            axes = target
        return product, axes

    def _oriented(self, k, first, second):
        """``first @ second`` contracting ``k``, with its cost in transposes (or None)."""
        (a, axes_a), (b, axes_b) = first, second
        free_a = [i for i in axes_a if i != k]
        free_b = [i for i in axes_b if i != k]
        if set(free_a) & set(free_b):
            return None
        cost = 0
        if len(axes_a) == 2 and axes_a[1] != k:
            a, cost = Permute(a), cost + 1
        if len(axes_b) == 2 and axes_b[0] != k:
            b, cost = Permute(b), cost + 1
        axes = tuple(free_a + free_b)
        wanted = [i for i in self.preferred if i in axes]
        if len(wanted) == len(axes) and list(axes) != wanted:
            cost += 1
        return cost, Dot(a, b), axes

    def _log_sum_exp(self, total: sp.Sum):
        """``log(Sum_k exp(u))`` as ``m + log(Sum_k exp(u - m))`` with ``m = max_k u``."""
        if len(total.limits) != 1 or not isinstance(total.function, sp.exp):
            return None
        k = total.limits[0][0]
        array, have = self._lower(total.function.args[0])
        if k not in have:
            return None
        axis = sp.Tuple(have.index(k))
        rest = tuple(a for a in have if a != k)
        peak = MaxOver(array, axis)
        shifted = array - align(peak, rest, have)
        return sp.log(SumOver(sp.exp(shifted), axis)) + peak, rest


def _piecewise(args) -> sp.Expr:
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    return sp.Piecewise(*pairs, evaluate=False)


def union_axes(groups: Sequence[Axes]) -> Axes:
    """All axes, ordered as in the operand with the most axes, then by first appearance."""
    ordered: list[sp.Symbol] = []
    for group in sorted(groups, key=len, reverse=True):
        for axis in group:
            if axis not in ordered:
                ordered.append(axis)
    return tuple(ordered)


def align(array: sp.Expr, have: Axes, target: Axes, *, full: bool = False) -> sp.Expr:
    """Permute and expand ``array`` (axes ``have``) so that it broadcasts against ``target``.

    Missing leading axes are left to NumPy's broadcasting unless ``full`` is set.
    """
    if not have:
        return array
    order = [a for a in target if a in have]
    if list(have) != order:
        perm = tuple(have.index(a) for a in order)
        array = Permute(array) if len(have) == 2 else Permute(array, sp.Tuple(*perm))
    first = target.index(order[0])
    missing = [p for p, a in enumerate(target) if a not in have and (full or p > first)]
    if missing:
        shift = 0 if full else first
        array = NewAxis(array, sp.Tuple(*[p - shift for p in missing]))
    return array


# -- numerically stable rewrites ----------------------------------------------------------------
def stabilize(expr: sp.Expr) -> sp.Expr:
    """Exact rewrites of an index expression into forms whose printed code cannot overflow."""
    expr = expr.replace(_is_log1p_exp, lambda e: Softplus(_exp_argument(e.args[0])))
    return _sigmoid_form(expr)


def _exp_argument(total: sp.Expr) -> sp.Expr:
    return next(a.args[0] for a in sp.Add.make_args(total) if isinstance(a, sp.exp))


def _is_log1p_exp(node) -> bool:
    if not isinstance(node, sp.log):
        return False
    terms = sp.Add.make_args(node.args[0])
    return len(terms) == 2 and 1 in terms and any(isinstance(t, sp.exp) for t in terms)


def _sigmoid_form(expr: sp.Expr) -> sp.Expr:
    """Write rational functions of ``exp(u)`` as polynomials in ``sigmoid(u)`` where possible."""
    arguments = []
    for node in expr.atoms(sp.exp):
        if any(isinstance(s, sp.Sum) for s in (expr,)) and node.has(sp.Sum):
            continue
        argument = node.args[0]
        if argument.could_extract_minus_sign():
            argument = -argument
        if argument not in arguments:
            arguments.append(argument)
    for argument in sorted(arguments, key=sp.default_sort_key):
        s = sp.Dummy("s")
        candidate = expr.xreplace({sp.exp(argument): s / (1 - s), sp.exp(-argument): (1 - s) / s})
        candidate = sp.factor_terms(sp.cancel(sp.together(candidate)))
        numerator, denominator = sp.fraction(sp.together(candidate))
        if denominator.has(s) or candidate.has(sp.exp(argument)):
            continue
        if any(
            node.has(s)
            for node in sp.preorder_traversal(candidate)
            if isinstance(node, sp.Function)
        ):
            continue
        expr = candidate.xreplace({s: Sigmoid(argument)})
    return expr
