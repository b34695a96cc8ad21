"""Rewriting a layer's backward in terms of what its forward pass keeps.

The engine tries the arrays a layer could keep (its declared ``keep``, or for an element-wise
layer its output) and proves rules ``lhs -> rhs`` from the forward definitions themselves
(``exp(-x) = 1/y - 1`` for sigmoid), then the sum identities that follow from them
(``Sum_m xhat[m, j] = 0``). A derivative is kept in terms of the output only where that is a
polynomial in it and determines the same values (:func:`_same_values`).
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from ..declare.forms import Forward
from .derivation import Adjoint, LayerDerivation, Rule
from .indexing import bound_renames, freshen_bound, simplify_indexed, sums_in


def _keep_candidates(form: Forward) -> list[tuple[str, ...]]:
    if form.keep is not None:
        return [form.keep]
    # Element-wise layers: prefer the output when the derivative is cheaper in terms of it.
    return [(form.output.name,), ()]


def _acceptable(form: Forward, derivation: LayerDerivation, keep: tuple[str, ...]) -> bool:
    if form.keep is not None or not keep:
        return True
    read = set(derivation.stored)
    if read & {a.name for a in form.inputs}:
        return False
    # Only worth it when the derivative of the output is a polynomial: no functions (an
    # inverse such as atanh(y) would also lose accuracy where y saturates) beyond the kinks'.
    for adjoint in derivation.vjp.values():
        functions = {
            f for f in adjoint.expr.atoms(sp.Function) if not isinstance(f, _KINKS)
        }
        roots = {p for p in adjoint.expr.atoms(sp.Pow) if not p.exp.is_Integer}
        if functions or roots:
            return False
    return True


_KINKS = (sp.Heaviside, sp.sign, sp.Abs, sp.Max, sp.Min, sp.Piecewise)


def _polynomial_in(derivation: LayerDerivation, keep: tuple[str, ...]) -> LayerDerivation | None:
    """``derivation`` with every VJP a polynomial in the kept arrays (cancelled where the
    rewriting left fractions), or None where one stays a rational function of them.

    A user's ``exp(x)/(1 + exp(x))`` rewritten in its output is a sum of fractions with
    ``y - 1`` below (0/0 once ``y`` rounds to 1); cancelled, it is sigmoid's ``y*(1 - y)``.
    """
    form = derivation.form
    kept = [form.arrays[name].base for name in keep if name in form.arrays]
    vjp = dict(derivation.vjp)
    steps = {name: list(trail) for name, trail in derivation.steps.items()}
    for name, adjoint in derivation.vjp.items():
        _, below = sp.fraction(sp.together(adjoint.expr))
        if not below.has(*kept):
            continue
        cancelled = sp.factor(sp.cancel(sp.together(adjoint.expr)))
        _, below = sp.fraction(cancelled)
        if below.has(*kept):
            return None
        vjp[name] = Adjoint(adjoint.array, adjoint.indices, cancelled)
        steps.setdefault(name, []).append(("fractions cancelled", cancelled))
    if vjp == derivation.vjp:
        return derivation
    return dataclasses.replace(derivation, vjp=vjp, steps=steps)


#: Where an element-wise layer's VJP in terms of its output is compared with the VJP in terms of
#: its input: both signs, several scales, no round numbers (where user kinks sit).
_SAMPLE_POINTS = (-7.31, -2.17, -0.83, -0.29, -0.061, 0.047, 0.31, 0.77, 1.43, 2.71, 6.93)


def _same_values(form: Forward, kept: LayerDerivation, plain: LayerDerivation) -> bool:
    """Whether ``kept``'s VJPs, with each kept stage written out, equal ``plain``'s at sample
    points. Solving ``y = f(x)`` for ``x`` can take one branch for the whole line: for
    ``y = x - max(x, 0) = min(x, 0)`` it gives ``x = y``, which holds only for ``x <= 0``, and
    ``step(x)`` would become ``step(y)``, always 0.

    The values are sympy numbers, whose exponent has no bound: ``exp(400*x)`` at ``x = 6.93`` is
    about ``1e1206``, past float64's range, where Python's complex numbers overflowed
    (``OverflowError``) or compared ``inf`` with ``inf``. A point where the plain derivative is
    undefined (``nan``, ``zoo``) says nothing and is passed over; one where only the kept form
    is refutes it, and so does having no point to compare at."""
    definitions = {s.array.base: s for s in form.stages if s.name in kept.stored}

    def written_out(element):
        stage = definitions[element.base]
        return stage.expr.xreplace(dict(zip(stage.indices, element.indices, strict=True)))

    inputs = {a.base for a in form.inputs}
    compared = False
    for name, adjoint in kept.vjp.items():
        mine = adjoint.expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base in definitions, written_out
        )
        theirs = plain.vjp[name].expr
        for point in _SAMPLE_POINTS:
            values: dict[sp.Expr, sp.Expr] = dict(form.constants)
            for element in (mine.atoms(sp.Indexed) | theirs.atoms(sp.Indexed)):
                values[element] = sp.Float(point) if element.base in inputs else sp.Float(0.7)
            for symbol in (mine.free_symbols | theirs.free_symbols) - set(values):
                values.setdefault(symbol, sp.Float(0.37))
            try:
                a = sp.N(mine.xreplace(values))
                b = sp.N(theirs.xreplace(values))
            except (TypeError, ValueError):
                return False
            if b.is_number and not b.is_finite:
                continue  # the derivative is undefined here: nothing to compare
            try:
                close = sp.Abs(a - b) <= 1e-9 * sp.Max(1, sp.Abs(b))
            except (TypeError, ValueError):  # a value sympy cannot compare (an unevaluated sum)
                return False
            if not a.is_finite or close is not sp.true:
                return False
            compared = True
    return compared


def _solve_unique(equation: sp.Expr, unknown: sp.Symbol) -> sp.Expr | None:
    """The one real solution of ``equation = 0`` for ``unknown``, or None.

    Asked of sympy only where the equation *peels* (:func:`_peels`); elsewhere no solution is
    sought, and what it would have rewritten stays as it is.
    """
    if not _peels(equation, unknown):
        return None
    try:
        solutions = sp.solveset(equation, unknown, domain=sp.S.Reals)
    except (NotImplementedError, ValueError, TypeError):
        return None
    if isinstance(solutions, sp.Intersection):
        finite = [a for a in solutions.args if isinstance(a, sp.FiniteSet)]
        solutions = finite[0] if len(finite) == 1 else solutions
    if not isinstance(solutions, sp.FiniteSet) or len(solutions) != 1:
        return None
    return sp.simplify(next(iter(solutions)))


def _peels(expr: sp.Expr, unknown: sp.Symbol) -> bool:
    """Whether ``expr = 0`` is solved for ``unknown`` by inverting one step at a time.

    That is: ``unknown`` sits in a single *kernel* (``unknown`` itself, or one function
    application or power with it in one argument), ``expr`` is a rational function of degree at
    most 1 in that kernel (``a*K + b``, ``(a*K + b)/(c*K + d)``), and the kernel's argument
    peels in turn. Sigmoid ``y = exp(u)/(1 + exp(u))`` peels to ``exp(u) = y/(1 - y)``, then to
    ``u = log(y/(1 - y))``; batch norm's ``xhat = (u - mu)*invstd`` at once; ``lse =
    log(s)`` to ``s = exp(lse)``. Each step is one inversion, so sympy's cost is bounded by the
    expression's depth; the test itself walks the expression once and expands nothing.

    What does not peel is not worth solving here, and can cost without bound:

    * two kernels (``x - max(x, 0)``, ``x*tanh(...)``, ``exp(-x**2/3)*sin(0.78*x)``): sympy
      searches for a way to combine them (the last grew past 24 GB) and at best finds a solution
      on one branch, which :func:`_same_values` then refutes. (Exponentials of commensurate
      arguments, tanh spelled ``(exp(x) - exp(-x))/(exp(x) + exp(-x))``, are two kernels too;
      solveset found no solution for that spelling either.)
    * degree ``d >= 2`` in the kernel (``x**3 + x``, ``(1 + x)**10000``): the inverse is an
      algebraic function of degree ``d`` of the kept value, not rational in it -- no real
      solution is unique for even ``d``, and otherwise it needs radicals, which
      :func:`_acceptable` refuses, or has no closed form at all. (With the kernel ``u`` itself:
      ``p'(u)`` a polynomial in ``p(u)`` forces ``d = 1``.) sympy reaches that conclusion by
      expanding the polynomial, at a cost growing with ``d`` (27 s for ``(1 + x)**10000``).

    The engine then reads the layer's input instead of its output, which is always correct.
    """
    kernels = _kernels(expr, unknown)
    if len(kernels) != 1:
        return False
    (kernel,) = kernels
    degree = _rational_degree(expr, kernel)
    if degree is None or max(degree) > 1:
        return False
    if kernel == unknown:
        return True
    inner = [arg for arg in kernel.args if arg.has(unknown)]
    return len(inner) == 1 and _peels(inner[0], unknown)


def _kernels(expr: sp.Expr, unknown: sp.Symbol) -> set[sp.Expr]:
    """The outermost subexpressions with ``unknown`` in them that are not sums, products or
    integer powers: ``{exp(u)}`` for ``exp(u)/(1 + exp(u))``, ``{u, Max(0, u)}`` for ``u -
    Max(0, u)``."""
    if not expr.has(unknown):
        return set()
    if expr == unknown:
        return {expr}
    if expr.is_Add or expr.is_Mul or (expr.is_Pow and expr.exp.is_Integer):
        return set().union(*(_kernels(arg, unknown) for arg in expr.args))
    return {expr}


def _rational_degree(expr: sp.Expr, kernel: sp.Expr) -> tuple[int, int] | None:
    """Bounds on the degrees in ``kernel`` of the numerator and the denominator of ``expr``
    over one denominator (``together``), from its tree: nothing is expanded, so ``(1 + u)**n``
    costs the same for every ``n``. None where ``kernel`` is inside something else."""
    if expr == kernel:
        return (1, 0)
    if not expr.has(kernel):
        return (0, 0)
    if expr.is_Pow and expr.exp.is_Integer:
        base = _rational_degree(expr.base, kernel)
        if base is None:
            return None
        power = int(expr.exp)
        above, below = base if power >= 0 else base[::-1]
        return (abs(power) * above, abs(power) * below)
    if not (expr.is_Add or expr.is_Mul):
        return None
    parts = [_rational_degree(arg, kernel) for arg in expr.args]
    if any(part is None for part in parts):
        return None
    below = sum(d for _, d in parts)
    if expr.is_Mul:
        return (sum(n for n, _ in parts), below)
    return (max(n + below - d for n, d in parts), below)


def _rules_towards(form: Forward, keep: tuple[str, ...]) -> list[Rule]:
    """Rewrite rules that replace raw quantities by the kept intermediates.

    For a kept stage ``K[I] = E`` and a quantity ``U`` in ``E`` (an array with the same indices,
    or a sum), solve ``K[I] = E`` for ``U``. Batch norm: ``x[n, j] -> mu[j] + xhat[n, j] /
    invstd[j]`` and ``var[j] -> invstd[j]**-2 - eps``; sigmoid: ``x -> log(y / (1 - y))``.
    """
    rules: list[Rule] = []
    arrays = form.arrays
    for stage in form.stages:
        if stage.name not in keep:
            continue
        candidates: list[sp.Expr] = []
        for element in stage.expr.atoms(sp.Indexed, sp.Symbol):
            name = element.base.name if isinstance(element, sp.Indexed) else element.name
            if name in keep or name not in arrays or any(p.name == name for p in form.params):
                continue
            indices = element.indices if isinstance(element, sp.Indexed) else ()
            if tuple(indices) == stage.indices:
                candidates.append(element)
        candidates += [s for s in sums_in(stage.expr) if not s.has(*_kept_bases(form, keep))]
        for candidate in candidates:
            unknown = sp.Dummy("u", real=True)
            equation = stage.array[stage.indices] - stage.expr.xreplace({candidate: unknown})
            if not equation.has(unknown) or _others_depend(equation, candidate, unknown):
                continue
            solution = _solve_unique(equation, unknown)
            if solution is None:
                continue
            rules.append(Rule(candidate, solution, stage.name))
    return rules


def _kept_bases(form: Forward, keep) -> list:
    return [form.arrays[name].base for name in keep if name in form.arrays]


def _others_depend(equation: sp.Expr, candidate: sp.Expr, unknown) -> bool:
    """True when the candidate still occurs after being replaced (it hides in a larger term)."""
    if isinstance(candidate, sp.Indexed):
        return equation.has(candidate.base)
    return False


def apply_rules(expr: sp.Expr, rules: list[Rule]) -> sp.Expr:
    """Apply index rewrite rules to every matching element or sum."""
    for rule in rules:
        if isinstance(rule.lhs, sp.Indexed):
            pattern_indices = rule.lhs.indices

            def rewrite(element, rule=rule, pattern_indices=pattern_indices):
                mapping = dict(zip(pattern_indices, element.indices, strict=True))
                return freshen_bound(rule.rhs).xreplace(mapping)

            expr = expr.replace(
                lambda e, rule=rule: isinstance(e, sp.Indexed) and e.base == rule.lhs.base,
                rewrite,
            )
        elif isinstance(rule.lhs, sp.Sum):
            expr = _replace_sums(expr, rule)
        else:
            expr = expr.xreplace({rule.lhs: rule.rhs})
    return expr


def _replace_sums(expr: sp.Expr, rule: Rule) -> sp.Expr:
    pattern: sp.Sum = rule.lhs
    free = sorted(
        pattern.free_symbols - {s for s in pattern.free_symbols if not s.is_integer},
        key=sp.default_sort_key,
    )
    free = [s for s in free if _is_index(s, pattern)]
    wilds = {s: sp.Wild(f"w_{s.name}") for s in free}
    pattern_body = pattern.function.xreplace(wilds)

    def matches(node):
        renames = bound_renames(node, pattern) if isinstance(node, sp.Sum) else None
        if renames is None:
            return None
        found = node.function.xreplace(renames).match(pattern_body)
        if found is None or set(found) != set(wilds.values()):
            return None
        return {s: found[w] for s, w in wilds.items()}

    def rewrite(node):
        mapping = matches(node)
        return rule.rhs.xreplace(mapping) if mapping is not None else node

    return expr.replace(lambda node: matches(node) is not None, rewrite)


def _is_index(symbol: sp.Symbol, expr: sp.Expr) -> bool:
    """An index of an element, or of a delta (a group norm's ``delta(g, floor(k*G/C))``)."""
    return any(symbol in e.indices for e in expr.atoms(sp.Indexed)) or any(
        symbol in d.free_symbols for d in expr.atoms(sp.KroneckerDelta)
    )


def _sum_identities(form: Forward, rules: list[Rule], names) -> list[Rule]:
    """Identities for sums that follow from the forward definitions.

    For a reduction stage ``R[I] = E`` (batch norm's mean and variance), rewrite both sides with
    the rules and solve for each sum that appears: ``mu[j] = mu[j] + Sum_m xhat[m, j] /
    (N invstd[j])`` gives ``Sum_m xhat[m, j] = 0``.
    """
    identities: list[Rule] = []
    if not rules:
        return identities
    for stage in form.stages:
        if not sums_in(stage.expr) or stage is form.output:
            continue
        lhs = apply_rules(stage.array[stage.indices], rules)
        rhs = simplify_indexed(apply_rules(stage.expr, rules), names)
        for total in sums_in(rhs):
            if total.has(*[r.lhs.base for r in rules if isinstance(r.lhs, sp.Indexed)]):
                continue
            unknown = sp.Dummy("s", real=True)
            solution = _solve_unique(lhs - rhs.xreplace({total: unknown}), unknown)
            if solution is not None and not solution.has(sp.Sum):
                identities.append(Rule(total, solution, stage.name))
    return identities
