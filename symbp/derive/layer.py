"""Derive one layer's vector-Jacobian products from its forward definition.

Given ``Forward`` (index notation, symbolic sizes) the engine computes, for every differentiable
input and parameter ``v`` and upstream gradient ``dy``::

    dv[idx] = sum over stages s that read v, sum over s's indices I of  ds[I] * d s[I] / d v[idx]

in reverse stage order (the *staged* chain rule: each stage's adjoint is computed once and reused,
backprop as dynamic programming). Then it produces the *compact* form: every intermediate adjoint
inlined, the result rewritten in terms of what the layer keeps from the forward pass (batch norm's
``xhat`` and ``invstd``, sigmoid's output ``y``), simplified with the sum identities that follow
from the forward definitions themselves (``Sum_m xhat[m, j] = 0``), and tidied.

Nothing here knows any particular layer: no derivative is written down anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from ..declare.forms import Array, Forward, Stage
from ..errors import DerivationError
from .arrays import ArrayOp, Erfc, Sigmoid, Softplus
from .indexing import fresh_index, freshen_bound, simplify_indexed, sums_in
from .kinks import differentiate
from .readings import computed_form
from .stable import log_sum_exp_terms, softmax_form, stabilize


@dataclass
class Adjoint:
    """``d<name>[indices] = expr``: the gradient of the loss with respect to an array."""

    array: Array
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr

    @property
    def name(self) -> str:
        return "d" + self.array.name

    @property
    def lhs(self) -> sp.Expr:
        base = adjoint_array(self.array)
        return base[self.indices]


@dataclass
class Rule:
    """A rewrite ``lhs -> rhs`` that the engine proved from a forward definition."""

    lhs: sp.Expr
    rhs: sp.Expr
    source: str  # the stage it came from


@dataclass(frozen=True)
class Carried(Stage):
    """``array[indices] = expr``: a costly function value that the forward pass computes and
    the backward needs again (GELU's ``erf(x/sqrt(2))``, SiLU's ``sigmoid(x)``), kept from the
    forward pass instead of computed twice. ``expr`` is in the stable form the code prints
    (:func:`~symbp.derive.stable.stabilize`); ``computed``, where given, is an equal index
    expression the forward pass computes it by instead (a softmax from shifted exponentials)."""

    computed: sp.Expr | None = None

    @property
    def math(self) -> sp.Expr:
        """``expr`` in plain notation: sigmoid and softplus as formulas in ``exp``."""
        return as_math(self.expr)


@dataclass
class LayerDerivation:
    """Everything the engine derived for one layer type."""

    form: Forward
    staged: list[Adjoint]
    vjp: dict[str, Adjoint]
    stored: tuple[str, ...]
    rules: list[Rule] = field(default_factory=list)
    identities: list[Rule] = field(default_factory=list)
    steps: dict[str, list[tuple[str, sp.Expr]]] = field(default_factory=dict)
    carried: tuple[Carried, ...] = ()
    #: the arrays of ``stored`` that the code's VJPs still read once they read the carried
    #: values (``None``: all of them)
    code_reads: tuple[str, ...] | None = None

    @property
    def upstream(self) -> Array:
        return adjoint_array(self.form.output.array)

    @property
    def cached(self) -> tuple[Array, ...]:
        """What the generated ``cache[layer]`` holds, in order: the arrays the code's VJPs read
        that are not parameters, then the carried values."""
        params = {p.name for p in self.form.params}
        reads = self.stored if self.code_reads is None else self.code_reads
        kept = [self.form.arrays[name] for name in reads if name not in params]
        return (*kept, *(c.array for c in self.carried))

    @property
    def params_read(self) -> tuple[Array, ...]:
        """The parameters the code's VJPs read."""
        reads = self.stored if self.code_reads is None else self.code_reads
        return tuple(p for p in self.form.params if p.name in reads)


def adjoint_array(array: Array) -> Array:
    return Array("d" + array.name, array.dims)


def derive_layer(form: Forward) -> LayerDerivation:
    """Staged and compact vector-Jacobian products of one layer."""
    names = bound_names(form)
    scalar_output = not form.output.array.dims
    staged = _staged_adjoints(form, names, unit_upstream=scalar_output)
    by_name = {adj.array.name: adj for adj in staged}

    def compact_with(keep: tuple[str, ...]) -> LayerDerivation:
        rules = _rules_towards(form, keep)
        identities = _sum_identities(form, rules, names)
        vjp, steps = {}, {}
        for array in form.differentiable:
            compact, trail = _compact(by_name[array.name], by_name, rules, identities, names, form)
            vjp[array.name] = compact
            steps[array.name] = trail
        stored = _stored(form, vjp)
        return LayerDerivation(form, staged, vjp, stored, rules, identities, steps)

    best = None
    for keep in _keep_candidates(form):
        derivation = compact_with(keep)
        if best is None:
            best = derivation
        if _acceptable(form, derivation, keep):
            if form.keep is None and keep:
                derivation = _polynomial_in(derivation, keep)
                if derivation is None:
                    continue  # a rational function of the output: it divides by 1 - y near 1
                if not _same_values(form, derivation, compact_with(())):
                    continue  # the kept output does not determine the derivative
            best = derivation
            break
    assert best is not None
    best.carried = carried_values(best)
    if best.carried:
        best.code_reads = _code_reads(best)
    return best


def bound_names(form: Forward) -> dict[sp.Expr, str]:
    """Letters for bound indices: a sum over the batch runs over ``m``, over features ``k``."""
    names: dict[sp.Expr, str] = {}
    for dim, letter in form.letters.items():
        names[dim - 1] = {"n": "m", "j": "k", "i": "k", "c": "k"}.get(letter, letter + "'")
    return names


# -- the staged chain rule ----------------------------------------------------------------------
def _staged_adjoints(form: Forward, names, *, unit_upstream: bool) -> list[Adjoint]:
    output = form.output
    adjoints: list[Adjoint] = []
    known: dict[str, sp.Expr] = {}
    targets = [s.array for s in reversed(form.stages[:-1])] + list(form.differentiable)
    for target in targets:
        free = tuple(fresh_index(i) for i in form.indices_for(target))
        element = target[free]
        total = sp.Integer(0)
        for stage in form.stages:
            if not stage.expr.has(target.base):
                continue
            upstream = adjoint_array(stage.array)[stage.indices]
            if stage is output and unit_upstream:
                upstream = sp.Integer(1)
            derivative = differentiate(stage.expr, element)  # the kink conventions applied
            contribution = upstream * derivative
            # Sum over the stage's own indices (they are bound in the chain rule).
            if stage.indices:
                limits = [
                    (i, 0, d - 1) for i, d in zip(stage.indices, stage.array.dims, strict=True)
                ]
                contribution = sp.Sum(contribution, *limits)
            total += contribution
        canonical = form.indices_for(target)
        expr = simplify_indexed(total, names).xreplace(dict(zip(free, canonical, strict=True)))
        adjoint = Adjoint(target, canonical, expr)
        adjoints.append(adjoint)
        known[target.name] = expr
    return adjoints


# -- rewriting in terms of what the forward pass keeps -----------------------------------------
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
            if not a.is_finite or (sp.Abs(a - b) <= 1e-9 * sp.Max(1, sp.Abs(b))) is not sp.true:
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
    invstd[j]`` and ``var[j] -> invstd[j]**-2 - epsilon``; sigmoid: ``x -> log(y / (1 - y))``.
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
        if not isinstance(node, sp.Sum) or len(node.limits) != len(pattern.limits):
            return None
        renames = {}
        for (a, lo_a, hi_a), (b, lo_b, hi_b) in zip(node.limits, pattern.limits, strict=True):
            if lo_a != lo_b or hi_a != hi_b:
                return None
            renames[a] = b
        found = node.function.xreplace(renames).match(pattern_body)
        if found is None or set(found) != set(wilds.values()):
            return None
        return {s: found[w] for s, w in wilds.items()}

    def rewrite(node):
        mapping = matches(node)
        return rule.rhs.xreplace(mapping) if mapping is not None else node

    return expr.replace(lambda node: matches(node) is not None, rewrite)


def _is_index(symbol: sp.Symbol, expr: sp.Expr) -> bool:
    return any(symbol in e.indices for e in expr.atoms(sp.Indexed))


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


# -- the compact form ---------------------------------------------------------------------------
def _compact(adjoint, by_name, rules, identities, names, form):
    steps: list[tuple[str, sp.Expr]] = [("chain rule through the stages", adjoint.expr)]
    expr = _inline(adjoint.expr, by_name, form)
    expr = simplify_indexed(expr, names)
    if expr != adjoint.expr:
        steps.append(("intermediate gradients substituted", expr))
    if rules:
        rewritten = simplify_indexed(sp.expand(apply_rules(expr, rules)), names)
        rewritten = simplify_indexed(apply_rules(rewritten, identities), names)
        if rewritten != expr:
            expr = rewritten
            steps.append(("in terms of the kept forward values", expr))
    tidy = tidy_expression(expr)
    if tidy != expr:
        steps.append(("collected", tidy))
    return Adjoint(adjoint.array, adjoint.indices, tidy), steps


def _inline(expr: sp.Expr, by_name: dict[str, Adjoint], form: Forward) -> sp.Expr:
    """Substitute every intermediate adjoint ``dS[..]`` by its formula, repeatedly."""
    intermediate = {s.name for s in form.stages[:-1]}
    formulas = {"d" + name: by_name[name] for name in intermediate}

    def is_pending(element) -> bool:
        if isinstance(element, sp.Indexed):
            return element.base.name in formulas
        return (
            isinstance(element, sp.Symbol)
            and element.name in formulas
            and not formulas[element.name].array.dims
        )

    def substitute(element):
        adjoint = formulas[_name(element)]
        indices = element.indices if isinstance(element, sp.Indexed) else ()
        return freshen_bound(adjoint.expr).xreplace(
            dict(zip(adjoint.indices, indices, strict=True))
        )

    for _ in range(len(formulas) + 1):
        if not any(is_pending(e) for e in _elements(expr)):
            return expr
        expr = expr.replace(is_pending, substitute)
    raise DerivationError("intermediate adjoints do not resolve (cyclic stages?)")


def _elements(expr: sp.Expr) -> set[sp.Expr]:
    """Array elements and scalar arrays in ``expr`` (not the labels inside ``Indexed``)."""
    indexed = expr.atoms(sp.Indexed)
    labels = {e.base.label for e in indexed}
    return indexed | {s for s in expr.atoms(sp.Symbol) if s not in labels}


def _name(element) -> str:
    return element.base.name if isinstance(element, sp.Indexed) else element.name


def tidy_expression(expr: sp.Expr) -> sp.Expr:
    """Combine exponentials and pull common factors out, without touching the sums' insides.

    With sums (batch norm), everything goes over one denominator: the compact closed form.
    Otherwise, of the candidate forms, the one with the fewest operations wins. A form that
    brings in an exponential the expression did not have (``together`` can turn ``exp(-u)``
    into ``1/exp(u)``-style factors) is never taken.
    """
    expr = sp.powsimp(expr, combine="exp")
    if isinstance(expr, sp.Piecewise):
        return expr
    known = expr.atoms(sp.exp)
    candidates = [expr, sp.factor_terms(expr), sp.factor_terms(sp.together(expr))]
    candidates = [c for c in candidates if c.atoms(sp.exp) <= known]
    if expr.has(sp.Sum):  # one fraction over the batch size: N*dy - sum(dy) - ...
        return candidates[-1]
    return min(candidates, key=lambda c: (sp.count_ops(c), candidates.index(c)))


def _stored(form: Forward, vjp: dict[str, Adjoint]) -> tuple[str, ...]:
    arrays = form.arrays
    read: set[str] = set()
    for adjoint in vjp.values():
        for element in _elements(adjoint.expr):
            name = _name(element)
            if name in arrays:
                read.add(name)
    order = list(arrays)
    return tuple(sorted(read, key=order.index))


# -- values computed once for both passes --------------------------------------------------------
#: Functions not worth keeping: comparisons and branches cost a pass like the read of a kept
#: array, and ``exp``/``log`` are printed as ``expm1``/``log1p`` where their surroundings allow,
#: which a kept value would hide.
_CHEAP = (
    sp.Abs,
    sp.sign,
    sp.Heaviside,
    sp.Max,
    sp.Min,
    sp.Piecewise,
    sp.floor,
    sp.ceiling,
    sp.KroneckerDelta,
    sp.exp,
    sp.log,
)


def _costly(node: sp.Expr) -> bool:
    """A function of the layer's arrays that takes more than a pass or two to compute."""
    if isinstance(node, ArrayOp):  # the array nodes of the printed forms
        return isinstance(node, (Sigmoid, Softplus, Erfc))
    return (
        isinstance(node, sp.Function)
        and not isinstance(node, _CHEAP)
        and node.has(sp.Indexed)
        and not node.has(sp.Sum)
    )


def carried_values(derivation: LayerDerivation) -> tuple[Carried, ...]:
    """The costly function values of an element-wise layer that both its forward formula and
    its VJPs compute (in the forms the code prints), outermost first; none for other layers.

    GELU's forward ``x*(1 + erf(x/sqrt(2)))/2`` and its VJP both call ``erf(x/sqrt(2))``: the
    forward pass keeps it (``erf_x``) and the backward reads it. A value is kept only if some
    VJP still reads it once the values kept before it are read instead.
    """
    form = derivation.form
    if not form.elementwise or len(form.stages) != 1:
        return _softmax_values(derivation)
    stage = form.output
    upstream = derivation.upstream.name
    forward = stabilize(stage.expr)
    backward = [
        stabilize(computed_form(a.expr, upstream, form.gather)) for a in derivation.vjp.values()
    ]
    nodes = []
    for node in sp.preorder_traversal(forward):
        if _costly(node) and node not in nodes:
            nodes.append(node)
    # outermost first: a value kept is read in place of every value inside it
    nodes = sorted(nodes, key=lambda node: -sum(node.has(other) for other in nodes))
    carried: list[Carried] = []
    taken = set(form.arrays) | {s.name for s in form.constants} | {upstream}
    for node in nodes:
        replaced = [e.xreplace({c.expr: c.array[c.indices] for c in carried}) for e in backward]
        if not any(e.has(node) for e in replaced):
            continue
        name = _carried_name(node, form, taken)
        taken.add(name)
        carried.append(Carried(Array(name, stage.array.dims), stage.indices, node))
    return tuple(carried)


def _softmax_values(derivation: LayerDerivation) -> tuple[Carried, ...]:
    """``exp(v - lse[I])`` read by a VJP, ``lse`` a stage ``log(Sum_k exp(u))`` (softmax
    cross-entropy's ``exp(z[n, c] - lse[n])``, the softmax): kept by the forward pass, which
    computes it from the shifted exponentials it takes for ``lse`` anyway
    (:func:`~symbp.derive.stable.softmax_form`), instead of from the rounded ``lse``."""
    form = derivation.form
    sums = {s.array.base: s for s in form.stages if log_sum_exp_terms(s.expr) is not None}
    if not sums:
        return ()
    upstream = derivation.upstream.name
    carried: list[Carried] = []
    taken = set(form.arrays) | {s.name for s in form.constants} | {upstream}
    for adjoint in derivation.vjp.values():
        code = stabilize(computed_form(adjoint.expr, upstream, form.gather))
        for node in sp.preorder_traversal(code):
            if not isinstance(node, sp.exp) or any(c.expr == node for c in carried):
                continue
            elements = [e for e in node.atoms(sp.Indexed) if e.base in sums]
            free = {i for i in node.free_symbols if _is_index(i, node)}
            if len(elements) != 1 or free != set(adjoint.indices):
                continue
            (element,) = elements
            if sp.diff(node.args[0], element) != -1:  # exp(v - lse), lse nowhere else
                continue
            inputs = [a.name for a in form.inputs if node.has(a.base)]
            name, count = "softmax_" + "_".join(inputs or ["value"]), 1
            while name in taken:
                count += 1
                name = f"softmax_{'_'.join(inputs or ['value'])}_{count}"
            taken.add(name)
            computed = softmax_form(node, element, sums[element.base])
            array = Array(name, adjoint.array.dims)
            carried.append(Carried(array, adjoint.indices, node, computed))
    return tuple(carried)


def _code_reads(derivation: LayerDerivation) -> tuple[str, ...]:
    """The arrays of ``stored`` that the code's VJPs read (the carried values read instead)."""
    form = derivation.form
    upstream = derivation.upstream.name
    kept = {c.expr: c.array[c.indices] for c in derivation.carried}
    read: set[str] = set()
    for adjoint in derivation.vjp.values():
        code = stabilize(computed_form(adjoint.expr, upstream, form.gather)).xreplace(kept)
        read |= {_name(element) for element in _elements(code)}
    return tuple(name for name in derivation.stored if name in read)


def _carried_name(node: sp.Expr, form: Forward, taken: set[str]) -> str:
    """``erf_x`` for ``erf(...x...)``, ``tanh_softplus_x`` for ``tanh(softplus(x))``;
    ``erf_x_2`` for a second ``erf`` of ``x``."""
    functions: list[str] = []
    for part in sp.preorder_traversal(node):
        if isinstance(part, sp.Function):
            functions.append(type(part).__name__.lower())
    inputs = [a.name for a in form.inputs if node.has(a.base)]
    stem = "_".join([*functions[:3], *(inputs or ["value"])])
    name, count = stem, 1
    while name in taken:
        count += 1
        name = f"{stem}_{count}"
    return name


def as_math(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the stable nodes written out: ``sigmoid(u) = 1/(1 + exp(-u))``,
    ``softplus(u) = log(1 + exp(u))``, ``erfc(-u)`` as it is."""
    expr = expr.replace(lambda e: isinstance(e, Sigmoid), lambda e: 1 / (1 + sp.exp(-e.args[0])))
    expr = expr.replace(lambda e: isinstance(e, Erfc), lambda e: sp.erfc(*e.args, evaluate=False))
    return expr.replace(lambda e: isinstance(e, Softplus), lambda e: sp.log(1 + sp.exp(e.args[0])))
