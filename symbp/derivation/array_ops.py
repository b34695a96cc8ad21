"""The array operations of the whole-array form: printing-only sympy functions.

:class:`ArrayOp` and its subclasses (matrix products, reductions, axis moves, sliding windows
and their adjoints) are the nodes :class:`symbp.derivation.arrays.Lowering` builds; the
printers print them, nothing differentiates or evaluates them.
"""

from __future__ import annotations

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


class Reshape(ArrayOp):
    """``a`` reshaped to ``dims`` in C order (the batch axis first): ``a.reshape(N, ...)``."""

    def _numpycode(self, printer) -> str:  # how NumPy printers print it
        array, *dims = (printer._print(a) for a in self.args)
        return f"{array}.reshape({', '.join(dims)})"


def c_order_position(indices, dims) -> sp.Expr:
    """The flat position of ``indices`` in an array of ``dims``, C order."""
    flat, stride = sp.Integer(0), sp.Integer(1)
    for index, dim in zip(reversed(tuple(indices)), reversed(tuple(dims)), strict=True):
        flat, stride = flat + index * stride, stride * dim
    return sp.expand(flat)


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


class Erfc(ArrayOp):
    """``erfc(u)`` kept as it is: sympy writes ``erfc(-u)`` as ``2 - erfc(u)``, which is
    ``2 - 2 = 0`` in floating point wherever ``erfc(-u)`` is tiny (``u < -6``)."""

    nargs = 1


class Step(ArrayOp):
    """``1`` where ``u > 0`` else ``0``: ``Heaviside(u, 0)``, the kink convention applied;
    ``Step(u, 1/2)``: ``1/2`` at 0 (``Heaviside(u, 1/2)``, a tie of ``max``/``min``)."""

    nargs = (1, 2)


class Einsum(ArrayOp):
    """``np.einsum(spec, a, b)``: a contraction over several indices (convolutions)."""


class TensorDot(ArrayOp):
    """``tensordot(a, b, axes_a, axes_b).transpose(order)``: one BLAS matrix product.

    Every sum of products of two arrays with no free index in common (a convolution's
    forward pass, its kernel gradient, the columns of its input gradient). NumPy's einsum can
    miss the GEMM there (one input channel) or copy a window view in an order that reads it
    in short runs; the generated module's ``_tensordot`` copies each operand in the order of
    its memory and hands BLAS the matrices, transposed where that saved a copy.
    """


class Windows(ArrayOp):
    """Sliding windows: ``(a, kernel sizes, stride, dilation)`` over the last two axes.

    Axes ``(..., H, W)`` become ``(..., P, Q, K_h, K_w)`` with element
    ``[..., p, q, i, j] = a[..., p*stride + i*dilation, q*stride + j*dilation]``.
    """


class Col2Im(ArrayOp):
    """The adjoint of :class:`Windows`: ``(cols, kernel sizes, stride, dilation)``.

    Adds ``cols[..., p, q, i, j]`` onto position ``(p*stride + i*dilation, q*stride +
    j*dilation)`` of a zero array (a scatter-add over windows).
    """


class Shifted(ArrayOp):
    """``(a, offsets, sizes)``: ``out[..., u, v] = a[..., u + du, v + dv]``, 0 outside ``a``:
    zero padding (negative offsets) and cropping (positive offsets) over the last axes."""


class Flipped(ArrayOp):
    """``(a, axes)``: ``a`` read backwards along ``axes`` (``a[:, :, ::-1, ::-1]``), a view:
    a kernel read as ``W[o, c, K_h - 1 - k, K_w - 1 - k']``, a full convolution's."""


class WindowMaximum(ArrayOp):
    """The maximum of each window ``(windows)`` over its last two (kernel) axes."""


class FirstArgmaxMask(ArrayOp):
    """1 at the first maximum of each window ``(windows)`` over its last two axes, else 0."""


class WindowArgmaxIndex(ArrayOp):
    """The row-major kernel offset ``i*K_w + j`` of each window's first maximum ``(windows)``."""


class ArgmaxMask(ArrayOp):
    """``(a, K_h, K_w)``: 1 at kernel offset ``(i, j)`` of the windows whose arg-max position
    ``a`` is ``i*K_w + j``, else 0 (axes: ``a``'s, then the kernel's)."""


def is_array_op(expr: sp.Basic) -> bool:
    """Whether ``expr`` is an operation of this module (not an array operation of another
    module: group sums, broadcasts, gathers)."""
    return type(expr).__module__ == __name__
