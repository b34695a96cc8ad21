"""The supremum of ``|g(x)|`` over the real line, by calculus, with sympy.

The bound the flow analysis reports for an activation is ``sup_x |f'(x)|``, and it must be a fact
sympy establishes, never a number typed into a table. For ``g`` continuous on an interval, the
supremum of ``|g|`` is the largest of ``|g|`` at the critical points inside (where ``g' = 0``),
at the closed endpoints, and of the limits at open or infinite endpoints. So:

1. ``Heaviside``, ``Max``, ``Min`` and ``Abs`` are rewritten as ``Piecewise`` and folded; each
   branch of a ``Piecewise`` gets its own domain (its condition minus the earlier ones);
2. on each interval of each domain, ``solveset`` finds the critical points; a periodic family
   (``ImageSet``) counts when ``g`` takes one value on all of it (``cos(2 pi n) = 1``);
3. the candidates' absolute values are compared; an infinite one means ``g`` is unbounded.

Anything sympy cannot settle -- a critical-point equation it cannot solve (SiLU's
``x tanh(x/2) = 2``), a branch condition in another variable, a function not known to be
continuous -- gives ``None``: no bound found, rather than a guess. Constant symbols may remain
(leaky ReLU's ``slope`` gives ``Max(1, slope)``) when their assumptions decide the comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

#: Functions continuous on the whole real line (for a real argument).
_CONTINUOUS = (
    sp.exp,
    sp.erf,
    sp.erfc,
    sp.sin,
    sp.cos,
    sp.tanh,
    sp.sinh,
    sp.cosh,
    sp.atan,
    sp.asinh,
)


@dataclass(frozen=True)
class Supremum:
    """``sup |g|``, and where it is reached.

    ``where`` is a point at which ``|g| = value`` (``attained``), or the limit point (``oo``,
    ``-oo``, or a finite endpoint of an open interval) it is only approached at; ``None`` when
    the maximum depends on constant symbols. ``values`` is the finite set of values ``g``
    takes when every branch is constant (ReLU: ``{0, 1}``), else ``None``.
    """

    value: sp.Expr
    where: sp.Expr | None
    attained: bool
    values: sp.FiniteSet | None = None

    @property
    def bounded(self) -> bool:
        return self.value.is_finite is not False and self.value != sp.oo


@dataclass(frozen=True)
class _Candidate:
    value: sp.Expr
    where: sp.Expr
    attained: bool


def supremum_abs(g: sp.Expr, x: sp.Symbol) -> Supremum | None:
    """``sup over real x of |g(x)|``, or ``None`` when sympy cannot establish it."""
    g = sp.piecewise_fold(g.rewrite(sp.Piecewise))
    pieces = _pieces(g, x)
    if pieces is None:
        return None
    candidates: list[_Candidate] = []
    constants: list[sp.Expr] = []
    for branch, domain in pieces:
        if domain is sp.S.EmptySet:
            continue
        found = _candidates_on(branch, domain, x)
        if found is None:
            return None
        candidates += found
        if not branch.has(x):
            constants.append(branch)
    if not candidates:
        return None
    values = sp.FiniteSet(*constants) if len(constants) == len(pieces) else None
    return _largest(candidates, values)


def _pieces(g: sp.Expr, x: sp.Symbol) -> list[tuple[sp.Expr, sp.Set]] | None:
    """The branches of ``g`` with the part of the real line where each one applies."""
    if not isinstance(g, sp.Piecewise):
        return [(g, sp.S.Reals)]
    taken: sp.Set = sp.S.EmptySet
    pieces = []
    for branch, condition in g.args:
        if isinstance(branch, sp.Piecewise) or condition.free_symbols - {x}:
            return None
        try:
            where = condition.as_set().intersect(sp.S.Reals)
        except (NotImplementedError, TypeError, ValueError):
            return None
        pieces.append((branch, sp.Complement(where, taken).simplify()))
        taken = sp.Union(taken, where)
    return pieces


def _candidates_on(h: sp.Expr, domain: sp.Set, x: sp.Symbol) -> list[_Candidate] | None:
    """Values of ``h`` that ``sup |h|`` over ``domain`` is the largest absolute value of."""
    parts = domain.args if isinstance(domain, sp.Union) else (domain,)
    found: list[_Candidate] = []
    for part in parts:
        if isinstance(part, sp.FiniteSet):
            found += [_Candidate(h.subs(x, point), point, True) for point in part]
        elif isinstance(part, sp.Interval):
            on_interval = _on_interval(h, part, x)
            if on_interval is None:
                return None
            found += on_interval
        else:
            return None
    return found


def _on_interval(h: sp.Expr, interval: sp.Interval, x: sp.Symbol) -> list[_Candidate] | None:
    if not h.has(x):
        return [_Candidate(h, _inside(interval), True)]
    if not _continuous(h, x, interval):
        return None
    try:
        critical = sp.solveset(sp.diff(h, x), x, interval)
    except (NotImplementedError, ValueError, TypeError):
        return None
    found = []
    for point in _points(critical):
        if point is None:
            return None
        found.append(_Candidate(sp.simplify(h.subs(x, point)), point, True))
    for end, closed, side in (
        (interval.start, not interval.left_open, "+"),
        (interval.end, not interval.right_open, "-"),
    ):
        if closed and end.is_finite:
            found.append(_Candidate(sp.simplify(h.subs(x, end)), end, True))
            continue
        try:
            limit = sp.limit(h, x, end, side)
        except (NotImplementedError, ValueError, TypeError):
            return None
        found.append(_Candidate(limit, end, False))
    return found


def _inside(interval: sp.Interval) -> sp.Expr:
    """A point of a non-empty interval (its closed start, its middle, or one step in)."""
    start, end = interval.start, interval.end
    if start.is_finite and not interval.left_open:
        return start
    if start.is_finite and end.is_finite:
        return (start + end) / 2
    if start.is_finite:
        return start + 1
    return end if not interval.right_open else (end - 1 if end.is_finite else sp.Integer(0))


def _points(critical: sp.Set) -> list[sp.Expr | None]:
    """Representative critical points; ``None`` marks a set sympy could not enumerate."""
    if critical is sp.S.EmptySet:
        return []
    if isinstance(critical, sp.FiniteSet):
        return list(critical)
    if isinstance(critical, sp.Union):
        return [p for part in critical.args for p in _points(part)]
    if isinstance(critical, sp.ImageSet) and len(critical.lamda.variables) == 1:
        # A periodic family counts as one point when the function agrees on all its members;
        # the caller evaluates at the member n = 0 and checks that n drops out.
        n = sp.Symbol("n", integer=True)
        point = critical.lamda(n)
        return [point] if critical.base_sets[0] is sp.S.Integers else [None]
    return [None]


def _continuous(h: sp.Expr, x: sp.Symbol, interval: sp.Interval) -> bool:
    """Whether ``h`` is continuous on ``interval``: sympy's answer, else a structural proof."""
    try:
        domain = sp.calculus.util.continuous_domain(h, x, interval)
        return interval.is_subset(domain) is True
    except (NotImplementedError, ValueError, TypeError):
        pass
    for node in sp.preorder_traversal(h):
        if isinstance(node, sp.Pow) and not (node.exp.is_integer and node.exp.is_nonnegative):
            if not node.base.is_positive:
                return False
        elif isinstance(node, sp.log):
            if not node.args[0].is_positive:
                return False
        elif isinstance(node, sp.Function) and not isinstance(node, _CONTINUOUS):
            return False
    return True


def _magnitude(value: sp.Expr) -> sp.Expr:
    if isinstance(value, sp.AccumBounds):
        return sp.Max(sp.Abs(value.min), sp.Abs(value.max))
    if value in (sp.oo, -sp.oo, sp.zoo) or value is sp.nan:
        return sp.oo
    return sp.Abs(value)


def _largest(candidates: list[_Candidate], values: sp.FiniteSet | None) -> Supremum | None:
    magnitudes = [sp.simplify(_magnitude(c.value)) for c in candidates]
    if any(m.has(sp.Symbol("n", integer=True)) or m is sp.nan for m in magnitudes):
        return None
    if any(m == sp.oo for m in magnitudes):
        where = next(c.where for c, m in zip(candidates, magnitudes, strict=True) if m == sp.oo)
        return Supremum(sp.oo, where, False, values)
    value = sp.simplify(sp.Max(*magnitudes))
    if value.free_symbols:
        return Supremum(value, None, False, values)
    # Attained beats approached at equal size: sup |sigmoid'| = 1/4 is attained at 0.
    order = sorted(
        range(len(candidates)),
        key=lambda k: (-float(magnitudes[k]), not candidates[k].attained),
    )
    best = candidates[order[0]]
    if sp.simplify(magnitudes[order[0]] - value) != 0:  # pragma: no cover - consistency
        return None
    return Supremum(value, best.where, best.attained, values)
