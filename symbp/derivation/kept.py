"""What a layer's backward reads from the forward pass, and the cheapest form to keep it in.

The engine's compact VJPs (:mod:`.layer`) read some arrays of the forward pass (``stored``).
Read whole, an array is kept whole. Two ways of reading need less, and the derived backward is
rewritten to read the smaller value instead (a rewrite in terms of a kept value, as
:mod:`.keep` rewrites ``x`` in terms of a kept output; the formulas stay the engine's):

* **sign**: an array read only through a step, ``Heaviside(y, 0)`` (ReLU's ``dx = step(y)*dy``):
  the step itself, ``y_positive = (y > 0)``, one byte per element (:func:`sign_variant`). Which
  of the two a layer keeps is the network plan's choice: the output itself where another layer
  keeps that array anyway (the next linear layer's input), else the step.
* **arg-max**: a window read only through ``FirstArgmax`` (max pooling's gradient, routed to
  each window's first maximum): the position of that maximum in the window, ``x_argmax``, one
  small integer per window instead of the whole input (:func:`argmax_values`; always taken).

:func:`read_forms` tells how a VJP reads each array, which is also what ``symbp flow`` prices
as the minimum a backward needs (:mod:`symbp.flow.memory`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy as sp

from ..declare.forms import ArgmaxAt, Array, FirstArgmax, WindowArgmax, WindowMax
from .derivation import Carried, LayerDerivation
from .readings import computed_form
from .stable import stabilize

FULL, SIGN, ARGMAX = "full", "sign", "argmax"


def code_forms(derivation: LayerDerivation) -> list[sp.Expr]:
    """The VJPs in the form the code computes (gathers, stable forms)."""
    form, upstream = derivation.form, derivation.upstream.name
    return [
        stabilize(computed_form(a.expr, upstream, form.gather)) for a in derivation.vjp.values()
    ]


def read_forms(derivation: LayerDerivation) -> dict[str, str]:
    """How the derived VJPs read each array they read that is not a parameter: ``"sign"``
    (only through ``Heaviside(a[...], 0)`` of the element itself), ``"argmax"`` (only inside a
    window's ``FirstArgmax``) or ``"full"``."""
    params = {p.name for p in derivation.form.params}
    names = [name for name in derivation.stored if name not in params]
    found: dict[str, set[str]] = {name: set() for name in names}

    def visit(expr: sp.Expr, how: str) -> None:
        if isinstance(expr, sp.Indexed):
            if expr.base.name in found:
                found[expr.base.name].add(how)
            for i in expr.indices:
                visit(i, FULL)
            return
        if (isinstance(expr, sp.Heaviside) and expr.args[1:] == (sp.Integer(0),)
                and isinstance(expr.args[0], sp.Indexed)):  # step(y), not step(y - 1/2)
            how = SIGN if how == FULL else how
        elif isinstance(expr, FirstArgmax):
            how = ARGMAX
        for arg in expr.args:
            visit(arg, how)

    for expr in code_forms(derivation):
        visit(expr, FULL)
    return {name: (ways.pop() if len(ways) == 1 else FULL) for name, ways in found.items()}


def carried_read(expr: sp.Expr, carried: tuple[Carried, ...]) -> sp.Expr:
    """``expr`` reading the carried values in place of what they hold."""
    plain = {c.expr: c.array[c.indices] for c in carried if not isinstance(c, CarriedArgmax)}
    expr = expr.xreplace(plain)
    for c in carried:
        if isinstance(c, CarriedArgmax):
            expr = c.read(expr)
    return expr


# -- sign ---------------------------------------------------------------------------------------
def sign_variant(derivation: LayerDerivation) -> LayerDerivation | None:
    """The derivation keeping ``step(a) = (a > 0)`` (a bool array) in place of an element-wise
    layer's kept array ``a`` that its VJPs read only through that step; None where none is."""
    form = derivation.form
    if not form.elementwise or derivation.carried:
        return None
    forms = read_forms(derivation)
    if len(forms) != 1 or set(forms.values()) != {SIGN}:
        return None
    (name,) = forms
    array = form.arrays[name]
    stage = next((s for s in form.stages if s.name == name), None)
    indices = stage.indices if stage is not None else form.indices_for(array)
    step = sp.Heaviside(array[indices], 0)
    mask = Carried(Array(f"{name}_positive", array.dims), tuple(indices), step, dtype="bool")
    reads = tuple(n for n in derivation.stored if n != name)
    return dataclasses.replace(derivation, carried=(mask,), code_reads=reads)


# -- arg-max -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CarriedArgmax(Carried):
    """A window's first arg-max position, kept for the backward's ``FirstArgmax`` of it.

    ``array[indices] = WindowArgmax(window, limits)`` for the stage ``y[indices] =
    WindowMax(window, limits)``; :meth:`read` rewrites each ``FirstArgmax(WindowMax(window'),
    k, k')`` of the backward, ``window'`` that window at other indices, as ``ArgmaxAt(array[...],
    k, k', K_h, K_w)``."""

    def read(self, expr: sp.Expr) -> sp.Expr:
        window = self.expr
        wilds = {i: sp.Wild(f"w_{i}") for i in self.indices}
        pattern = window.function.xreplace(wilds)
        sizes = [high - low + 1 for _, low, high in window.limits]

        def rewrite(node):
            peak = node.args[0]
            renamed = peak.function.xreplace(dict(zip(peak.variables, window.variables,
                                                      strict=True)))
            found = renamed.match(pattern)
            if found is None or set(found) != set(wilds.values()):
                return node
            element = self.array[tuple(found[wilds[i]] for i in self.indices)]
            return ArgmaxAt(element, *node.args[1:], *sizes)

        return expr.replace(lambda e: isinstance(e, FirstArgmax), rewrite)


def argmax_values(derivation: LayerDerivation) -> tuple[Carried, ...]:
    """The arg-max of each window a layer's VJPs read only through ``FirstArgmax`` (max
    pooling's input), kept in its place (:class:`CarriedArgmax`)."""
    form = derivation.form
    forms = read_forms(derivation)
    if not forms or set(forms.values()) != {ARGMAX}:
        return ()
    carried = []
    for stage in form.stages:
        if not isinstance(stage.expr, WindowMax):
            continue
        names = {e.base.name for e in stage.expr.function.atoms(sp.Indexed)}
        (read,) = names if len(names) == 1 else (None,)
        if read not in forms:
            continue
        inputs = [a.name for a in form.inputs]
        # a padding stage of the input is still called by the input's name
        label = read if read in inputs or len(inputs) != 1 else inputs[0]
        position = WindowArgmax(stage.expr.function, *stage.expr.limits)
        array = Array(f"{label}_argmax", stage.array.dims)
        carried.append(CarriedArgmax(array, stage.indices, position, dtype="index"))
    if not carried:
        return ()
    tried = [carried_read(e, tuple(carried)) for e in code_forms(derivation)]
    if any(e.has(FirstArgmax) for e in tried):
        return ()  # a window the rewrite did not recognise: keep the input
    return tuple(carried)
