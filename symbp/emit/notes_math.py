"""The scalar math the notes add to the engine's derivation.

An activation's ``f`` and its derivative in ``x`` and, where it is one, in the output ``y``
(:func:`activation_formulas`); the largest value of ``f'`` (:func:`_largest_derivative`, the
bound the notes state); a plain reading of a windowed gradient (:func:`_readable`,
:func:`_full_convolution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..derivation.array_ops import Dot, Permute
from ..derivation.arrays import (
    Col2Im,
    Einsum,
    FirstArgmaxMask,
    MaxOver,
    Shifted,
    SumOver,
    TensorDot,
    Windows,
)
from ..derivation.indexing import simplify_indexed
from ..derivation.layer import LayerDerivation, bound_names
from .array_shapes import array_shape

X_SCALAR = sp.Symbol("x", real=True)
Y_SCALAR = sp.Symbol("y", real=True)


@dataclass
class ActivationFormulas:
    """What the notes print for an element-wise layer: ``f(x)`` and its derivative ``f'``, as
    the engine derived it in the input ``x`` (staged) and, where it differs, in its compact
    form (which may read the output ``y = f(x)``). Scalars: ``x``, ``y`` (:data:`X_SCALAR`,
    :data:`Y_SCALAR`), a parameter or auxiliary array by its name (``alpha``)."""

    f: sp.Expr
    derivatives: list[sp.Expr]


def activation_formulas(derivation: LayerDerivation) -> ActivationFormulas:
    """``f`` and ``f'`` of an element-wise layer, read off the engine's derivation: the
    gradient *of the input* ``x`` (a layer with a parameter, such as prelu's ``alpha``, has
    the parameter's gradient among its adjoints too), at unit upstream gradient."""
    form = derivation.form
    stage = form.output
    source = form.inputs[0]
    scalars = {stage.array[stage.indices]: Y_SCALAR, source[stage.indices]: X_SCALAR}
    scalars[derivation.upstream[stage.indices]] = sp.Integer(1)
    # a parameter or auxiliary array, whatever it is indexed by (prelu's per-feature alpha_j)
    named = {a.name: sp.Symbol(a.name, real=True) for a in form.aux + form.params if a.dims}

    def scalar(expr):
        expr = expr.xreplace(scalars)
        return expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base.name in named,
            lambda e: named[e.base.name],
        )

    staged = next(a for a in derivation.staged if a.array.name == source.name)
    in_x = scalar(staged.expr)
    compact = scalar(derivation.vjp[source.name].expr)
    derivatives = [in_x] if compact == in_x else [in_x, compact]
    return ActivationFormulas(f=scalar(stage.expr), derivatives=derivatives)


def _readable(lowered: sp.Expr, shapes: dict[str, tuple] | None = None) -> sp.Expr | None:
    """A whole-array form that reads as matrix notation, or ``None``.

    ``einsum`` of two arrays with the same subscripts summed over some axes is the sum of their
    element-wise product over those axes; a tensor contraction that is a matrix product
    (:func:`as_matrix_product`, the arrays' ``shapes`` by name) is that product; sliding
    windows (convolution, pooling) and other contractions (over several axes) have no notation
    that reads better than the index form, so those formulas keep the index form.
    """
    if lowered.has(Windows, Col2Im, Shifted, FirstArgmaxMask, MaxOver):
        return None
    lowered = lowered.replace(lambda e: isinstance(e, TensorDot),
                              lambda e: as_matrix_product(e, shapes or {}) or e)
    if lowered.has(TensorDot):
        return None

    def as_sum(einsum):
        spec, *operands = einsum.args
        inputs, output = str(spec.name if isinstance(spec, sp.Symbol) else spec).split("->")
        parts = inputs.split(",")
        if len(parts) == len(operands) and len(set(parts)) == 1 and set(output) <= set(parts[0]):
            axes = [k for k, letter in enumerate(parts[0]) if letter not in output]
            return SumOver(sp.Mul(*operands), sp.Tuple(*axes))
        return einsum

    lowered = lowered.replace(lambda e: isinstance(e, Einsum), as_sum)
    if lowered.has(Einsum):
        return None
    # a sum over the batch and the image (batch norm on images: axes 0, 2, 3) has no matrix
    # notation; NumPy's spelling (sum over axes (0,2,3)) is not mathematics: index form
    for total in lowered.atoms(SumOver):
        axes = tuple(int(a) for a in total.args[1])
        shape = array_shape(total.args[0], shapes or {})
        if axes not in ((0,), (1,), (0, 1)) or (axes != (0,) and shape and len(shape) > 2):
            return None  # 1^T A 1 is a matrix's sum, not a sum over two axes of a 3-axis array
    return lowered


def as_matrix_product(product: TensorDot, shapes: dict[str, tuple]) -> Dot | None:
    """``tensordot(a, b, axes_a, axes_b).transpose(order)`` as the matrix product ``L R``
    that computes the same array, or ``None`` where there is none: one axis contracted, the
    last of ``L`` and the first of ``R`` (or of its transpose, for a matrix), ``R`` a matrix or
    a vector (applied to every row of ``L``: a linear layer on ``(N, T, D)`` is ``h W``, its
    input gradient ``dz W^T``), the result's axes ``L``'s free axes then ``R``'s. ``shapes``:
    the arrays' shapes by name (:func:`~.array_shapes.array_shape`)."""
    a, b, axes_a, axes_b, order = product.args
    shapes = [array_shape(operand, shapes) for operand in (a, b)]
    if None in shapes or len(axes_a) != 1:
        return None
    rank_a, rank_b = (len(shape) for shape in shapes)
    order, total = tuple(int(k) for k in order), rank_a + rank_b - 2
    natural = tuple(range(total))  # a's free axes, then b's
    swapped = tuple(range(rank_a - 1, total)) + tuple(range(rank_a - 1))
    for (left, k_left, r_left), (right, k_right, r_right), wanted in (
            ((a, int(axes_a[0]), rank_a), (b, int(axes_b[0]), rank_b), natural),
            ((b, int(axes_b[0]), rank_b), (a, int(axes_a[0]), rank_a), swapped)):
        if order != wanted or r_right > 2:
            continue
        if k_left != r_left - 1:  # contracted on its first axis: a matrix's transpose
            if (k_left, r_left) != (0, 2):
                continue
            left = Permute(left)
        if k_right != 0:  # contracted on its last axis: a matrix's transpose
            if (k_right, r_right) != (1, 2):
                continue
            right = Permute(right)
        return Dot(left, right)
    return None


def _full_convolution(derivation: LayerDerivation) -> sp.Expr | None:
    """The input gradient read as a full convolution, where it is one.

    With the layer's constants (stride, dilation) substituted, solving the Kronecker deltas of
    the input gradient for the summation indices (``scatter=False``) leaves a parameter read
    at ``free index - summation index`` (``W_{o,c,h-p,w-q}``): a convolution of the upstream
    gradient with the kernel, i.e. a cross-correlation with the flipped kernel. ``None`` if the
    derived formula does not have that shape.
    """
    form = derivation.form
    if not form.params:
        return None
    adjoint = derivation.vjp.get(form.inputs[0].name)  # (none for integer ids)
    if adjoint is None or not adjoint.expr.has(sp.KroneckerDelta):
        return None
    expr = adjoint.expr.xreplace(form.constants)
    solved = simplify_indexed(expr, bound_names(form), scatter=False)
    if solved.has(sp.KroneckerDelta) or not isinstance(solved, sp.Sum):
        return None
    free, bound = set(adjoint.indices), set(solved.variables)
    params = {p.name for p in form.params}
    flipped = 0
    for element in solved.atoms(sp.Indexed):
        if element.base.name not in params:
            continue
        for position in element.indices:
            terms = sp.Add.make_args(sp.expand(position))
            if (
                len(terms) == 2
                and any(t in free for t in terms)
                and any(-t in bound for t in terms)
            ):
                flipped += 1
    return solved if flipped else None


def _largest_derivative(f, in_x, compact, constants, ranges=None) -> sp.Expr | None:
    """The largest value of ``f'`` over the reals, where sympy can find it exactly.

    A derivative written in the output ``y`` is maximized over the range of ``f`` (sigmoid:
    ``y (1 - y)`` on ``(0, 1)`` gives 1/4); a piecewise one piece by piece. A piece in an
    auxiliary input of known range (``ranges``: rrelu's slope ``r`` in ``[lower, upper]``) is
    maximized over that range, so ``max(1, r)`` is 1 when ``upper <= 1``.
    """
    ranges = ranges or {}
    values = {s: v for s, v in constants.items()}
    try:
        if Y_SCALAR in compact.free_symbols and compact.is_polynomial(Y_SCALAR):
            if compact.free_symbols - {Y_SCALAR}:
                return None
            span = sp.calculus.util.function_range(f, X_SCALAR, sp.S.Reals)
            return sp.maximum(compact, Y_SCALAR, span)
        derivative = in_x.rewrite(sp.Piecewise) if in_x.has(sp.Heaviside) else in_x
        if isinstance(derivative, sp.Piecewise):
            best = []
            remaining = sp.S.Reals
            for piece, condition in derivative.args:
                where = remaining if condition == sp.true else condition.as_set() & remaining
                remaining = remaining - where
                piece = piece.xreplace(values)
                if where is sp.S.EmptySet:
                    continue
                for symbol, span in ranges.items():
                    if symbol in piece.free_symbols and piece.free_symbols <= {symbol}:
                        piece = sp.maximum(piece, symbol, span)
                if piece.free_symbols - {X_SCALAR}:
                    best.append(piece)  # a parameter: the bound is symbolic
                elif X_SCALAR in piece.free_symbols:
                    best.append(sp.maximum(piece, X_SCALAR, where))
                else:
                    best.append(piece)
            return sp.Max(*best)
    except (NotImplementedError, ValueError, TypeError):
        return None
    return None


# -- text in the two formats ---------------------------------------------------------------
def _code(value: str, fmt: str) -> str:
    """Plain text for a code span: ``\\texttt`` in LaTeX, backticks in Markdown."""
    return _text(value, fmt) if fmt == "tex" else value.replace("`", "'")


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "&": r"\&",
    "%": r"\%",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "^": r"\^{}",
    "~": r"\~{}",
}


def _text(value: str, fmt: str) -> str:
    """Plain text (a layer name) made safe for the format."""
    if fmt == "tex":
        return "".join(_TEX_SPECIAL.get(c, c) for c in value)
    return value.replace("|", r"\|")


#: Verdicts by (derivation, staged, batch); the derivation itself is kept so that an id is never
#: reused for another one while its verdict is cached.
