"""Printing-only nodes for the notes' network-level equations, and how LaTeX prints them.

The notes build the network's equations from these nodes and from the engine's expressions,
never from strings: ``AtLayer(h, 3)`` is :math:`\\mathbf{h}^{(3)}`, ``Delta(3)``
:math:`\\boldsymbol{\\delta}^{(3)}`, ``Jacobian(a, b)`` the partial derivative of ``a`` by ``b``.
:class:`NetworkNodePrinting` holds their ``_print_`` methods, mixed into
:class:`~symbp.emit.latex_printer.NotesLatexPrinter`.
"""

from __future__ import annotations

import sympy as sp


# -- the nodes ------------------------------------
class NotesNode(sp.Function):
    """Base of the nodes that only the notes print; never differentiated or evaluated."""

    is_real = True


class AtLayer(NotesNode):
    """``AtLayer(Symbol(name), Symbol(label))``: the array ``name`` of layer ``label``,
    printed with the layer as a superscript: ``\\mathbf{W}^{(2)}``."""

    nargs = 2


class Delta(NotesNode):
    """``Delta(Symbol(label))``: the gradient of the loss with respect to ``h^{(label)}``."""

    nargs = 1


class Grad(NotesNode):
    """``Grad(v)``: the gradient of the loss with respect to ``v``, in the chosen notation."""

    nargs = 1


class Jacobian(NotesNode):
    """``Jacobian(y, x)``: the Jacobian of ``y`` with respect to ``x``."""

    nargs = 2


class Apply(NotesNode):
    """``Apply(Symbol(label), x)``: the function ``f_label`` applied to ``x``."""

    nargs = 2


class Compose(NotesNode):
    """``Compose(Symbol(last), Symbol(first), x)``: ``f_last o ... o f_first (x)``."""

    nargs = 3


class Shape(NotesNode):
    """``Shape(N, 784)``: an array shape, printed ``N \\times 784``."""


class InSpace(NotesNode):
    """``InSpace(v, Shape(...))``: ``v`` is a real array of that shape."""

    nargs = 2


class Chain(NotesNode):
    """A product of Jacobians, printed in the given order (matrix products do not commute);
    the symbol :data:`Ellipsis_` stands for the factors left out of a long chain."""


#: The factors left out of a long :class:`Chain`, printed ``\cdots``.
Ellipsis_ = sp.Symbol("...")


class Identity(NotesNode):
    """The identity matrix (the Jacobian of a skip connection)."""

    nargs = 0


class Norm(NotesNode):
    """``Norm(A)``: the spectral norm of ``A``, printed ``\\lVert A \\rVert_2``."""

    nargs = 1


class Element(NotesNode):
    """``Element(node, *indices)``: one element of a network-level array (an :class:`AtLayer`
    or a :class:`Delta`), for layers written in index form: ``h^{(2)}_{ncpq}``."""


class StepIndex(sp.Symbol):
    """The time step of the notes' recurrences, printed as its letter (``t``), never as an
    array that has that name (mse's target ``t``)."""

    def _latex(self, printer):
        return self.name


class AtStep(NotesNode):
    """``AtStep(node, t)``: the value of a network-level array (an :class:`AtLayer`, a
    :class:`Delta`) at time step ``t`` of a layer unrolled over time: ``\\mathbf{h}^{(1)}_{t}``."""

    nargs = 2


class ForSteps(NotesNode):
    """``ForSteps(expr, t, first, last)``: ``expr`` for each step ``t`` from ``first`` to
    ``last`` (``t = T, \\dots, 1``: backwards)."""

    nargs = 4


class StepsOf(NotesNode):
    """``StepsOf(node, first, last)``: the sequence of ``node``'s values at the steps,
    ``(\\mathbf{h}^{(1)}_{1}, \\dots, \\mathbf{h}^{(1)}_{T})``."""

    nargs = 3


#: Separator of the rows of an ``aligned`` block (what :meth:`NotesLatexPrinter.rows` joins with).


def _label(symbol) -> str:
    return symbol.name if isinstance(symbol, sp.Symbol) else str(symbol)


class NetworkNodePrinting:
    """The ``_print_`` methods of the nodes above (a mixin of the notes' LaTeX printer)."""

    def _print_AtLayer(self, expr):
        name, label = expr.args
        return self._array_tex(name.name, layer=_label(label))

    def _print_Delta(self, expr):
        return rf"\boldsymbol{{\delta}}^{{({_label(expr.args[0])})}}"

    def _print_Grad(self, expr):
        return self.grad_tex(self._print(expr.args[0]))

    def _print_Jacobian(self, expr):
        top, bottom = (self._print(a) for a in expr.args)
        return rf"\frac{{\partial {top}}}{{\partial {bottom}}}"

    def _print_Apply(self, expr):
        label, argument = expr.args
        return rf"f_{{{_label(label)}}}\left({self._print(argument)}\right)"

    def _print_Compose(self, expr):
        last, first, argument = expr.args
        return (
            rf"f_{{{_label(last)}}} \circ \cdots \circ f_{{{_label(first)}}}"
            rf"\left({self._print(argument)}\right)"
        )

    def _print_Shape(self, expr):
        return r" \times ".join(self._print(d) for d in expr.args) or "1"

    def _print_InSpace(self, expr):
        value, shape = expr.args
        space = r"\mathbb{R}" if not shape.args else rf"\mathbb{{R}}^{{{self._print(shape)}}}"
        return rf"{self._print(value)} \in {space}"

    def _print_Chain(self, expr):
        return " ".join(r"\cdots" if a == Ellipsis_ else self._print(a) for a in expr.args)

    def _print_Identity(self, expr):
        return r"\mathbf{I}"

    def _print_Norm(self, expr):
        return rf"\left\lVert {self._print(expr.args[0])} \right\rVert_2"

    def _print_AtStep(self, expr):
        node, step = expr.args
        return f"{self._print(node)}_{{{self._print(step)}}}"

    def _print_ForSteps(self, expr):
        value, step, first, last = (self._print(a) for a in expr.args)
        return rf"{value}, \qquad {step} = {first}, \dots, {last}"

    def _print_StepsOf(self, expr):
        node, first, last = expr.args
        steps = (self._print(AtStep(node, first)), self._print(AtStep(node, last)))
        return rf"\left({steps[0]}, \dots, {steps[1]}\right)"

    def _print_Element(self, expr):
        node, *indices = expr.args
        sub = self._indices_tex(indices)
        if isinstance(node, Delta):
            return rf"\delta^{{({_label(node.args[0])})}}_{{{sub}}}"
        name, label = node.args
        return self.name_tex(name.name, sub=sub, layer=_label(label))
