"""Plain-words readings of derived formulas: what a gradient *is*, recognised from its structure.

The engine keeps a strided or padded convolution's input gradient as a scatter (Kronecker deltas
tying an input position to ``p*S + i*D``), which is how the array code computes it. Solving
those deltas the other way (:func:`gather_form`) gives the gather
form that textbooks print, and its index pattern says what it is:

* the upstream gradient read at ``h + P - k`` while the kernel is read at ``k``: a *full
  convolution of the upstream gradient with the flipped kernel*;
* the kernel read at ``h + P - p*S`` while the upstream gradient is read at ``p``: a transposed
  (strided) convolution, each upstream entry scattered through the kernel;
* the input read at ``i + p`` against the upstream gradient at ``p``: a correlation of the
  input with the upstream gradient (a kernel's gradient);
* the upstream gradient read in windows, ``h*S + k``, against an array read at the window's
  summed indices: a correlation of the upstream gradient (a transposed convolution's
  gradients, conv2d's forward pass applied to ``dy``);
* a window's ``FirstArgmax`` factor: the gradient routed to each window's arg-max.

Nothing here changes a formula. The readings are for printing (``symbp derive``, the notes);
the gather form is also how a layer that asks for it (``Forward.gather``: a same-size
convolution) has its input gradient computed (:func:`computed_form`).
"""

from __future__ import annotations

import sympy as sp

from ..declare.forms import FirstArgmax
from .indexing import Term, rebuild, terms_of


def _negated(index: sp.Expr, bound: set[sp.Symbol]) -> set[sp.Symbol]:
    """Bound indices that ``index`` reads backwards (coefficient < 0)."""
    index = sp.expand(index)
    return {s for s in index.free_symbols & bound if index.coeff(s).is_negative}


def _plain(index: sp.Expr, bound: set[sp.Symbol]) -> set[sp.Symbol]:
    return {index} & bound if isinstance(index, sp.Symbol) else set()


def gather_form(expr: sp.Expr, upstream: str) -> sp.Expr:
    """``expr`` with its Kronecker deltas solved, the textbook (gather) reading.

    A delta is solved for an index of the upstream gradient where it can be (``p = h + P - k``:
    ``dy`` read at ``h + P - k``), else for the window offset (``k = h + P - p*S``).
    """
    terms = []
    for term in terms_of(expr):
        factor, limits = term.factor, list(term.limits)
        reads = {i for e in sp.Mul.make_args(factor) if isinstance(e, sp.Indexed)
                 and e.base.name == upstream for i in e.indices}
        for delta in [f for f in sp.Mul.make_args(factor) if isinstance(f, sp.KroneckerDelta)]:
            difference = sp.expand(delta.args[0] - delta.args[1])
            bound = {limit[0] for limit in limits} & difference.free_symbols
            choices = sorted(bound, key=lambda s: (s not in reads, sp.default_sort_key(s)))
            # Only an index some array reads may go: that array, 0 outside its range, keeps
            # the delta's range condition (an index read by no array would lose it).
            read = {i for e in sp.Mul.make_args(factor) if isinstance(e, sp.Indexed)
                    for i in e.free_symbols}
            for index in choices:
                coefficient = difference.coeff(index)
                if coefficient in (1, -1) and index in read:
                    value = sp.expand(-(difference - coefficient * index) / coefficient)
                    factor = (factor / delta).xreplace({index: value})
                    limits = [limit for limit in limits if limit[0] != index]
                    break
        terms.append(Term(tuple(limits), factor))
    return rebuild(terms)


def computed_form(expr: sp.Expr, upstream: str, gather: bool) -> sp.Expr:
    """The form of a derived gradient that the array code computes: its gather form when the
    layer asks for it (``Forward.gather``), else the formula as derived."""
    return gather_form(expr, upstream) if gather else expr


def reading(expr: sp.Expr, upstream: str) -> str | None:
    """One sentence on what the gradient ``expr`` computes, or ``None`` when nothing is known."""
    if expr.has(FirstArgmax):
        return f"{upstream} routed to the (first) arg-max of each window"
    gathered = gather_form(expr, upstream)
    for total in gathered.atoms(sp.Sum):
        bound = set(total.variables)
        elements = [f for f in sp.Mul.make_args(total.function) if isinstance(f, sp.Indexed)]
        grads = [e for e in elements if e.base.name == upstream]
        others = [e for e in elements if e.base.name != upstream]
        if len(grads) != 1 or not others:
            if len(grads) == 1 and not others and any(_negated(i, bound) for i in grads[0].indices):
                return f"each window's share of {upstream} added back where the window read it"
            continue
        (grad,) = grads
        backwards = set().union(*[_negated(i, bound) for i in grad.indices])
        for other in others:
            forwards = set().union(*[_plain(i, bound) for i in other.indices])
            if backwards and backwards <= forwards:
                return (f"a full convolution of {upstream} with the flipped kernel "
                        f"{other.base.name} ({upstream} read as 0 outside its range)")
            shifted = [sp.expand(i) for i in other.indices
                       if not isinstance(i, sp.Symbol) and sp.expand(i).free_symbols & bound
                       and sp.expand(i).free_symbols - bound]
            plain = set().union(*[_plain(i, bound) for i in grad.indices])
            if shifted and all(all(i.coeff(s).is_positive for s in i.free_symbols & bound)
                               for i in shifted) and not backwards and plain:
                return (f"a correlation of {other.base.name} with {upstream} (the window at "
                        f"each kernel offset, weighted by {upstream})")
            windowed = [sp.expand(i) for i in grad.indices
                        if sp.expand(i).free_symbols & bound and sp.expand(i).free_symbols - bound]
            offsets = set().union(*[i.free_symbols & bound for i in windowed])
            if windowed and not backwards and offsets <= set(other.indices) and all(
                    i.coeff(s).is_positive for i in windowed for s in i.free_symbols & bound):
                return (f"a correlation of {upstream} with {other.base.name} ({upstream} read "
                        f"in windows, as conv2d's forward pass reads its input)")
            flipped = set().union(*[_negated(i, bound) for i in other.indices])
            gathered_at = set().union(*[_plain(i, bound) for i in grad.indices])
            if flipped and flipped <= gathered_at:
                return (f"a transposed (strided) convolution: each entry of {upstream} scattered "
                        f"through the kernel {other.base.name}")
    if any(isinstance(side, sp.Indexed) and side.base.is_integer
           for d in gathered.atoms(sp.KroneckerDelta) for side in d.args):
        return f"a scatter-add: each row of {upstream} added to the row its id picks"
    if any(d.has(sp.floor) for d in gathered.atoms(sp.KroneckerDelta)):
        return "per sample, sums over each group's channels, read back at every channel"
    if gathered.has(sp.KroneckerDelta):
        return f"a scatter-add of {upstream} back to where each window read its input"
    return None
