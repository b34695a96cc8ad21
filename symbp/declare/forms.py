"""The forward pass of a layer in index notation: the one thing a layer type declares.

A :class:`Forward` lists the layer's arrays (differentiable inputs, parameters, auxiliary data
such as random slopes or labels) with symbolic sizes, and a sequence of named :class:`Stage`
definitions, each ``name[indices] = expression`` in terms of earlier arrays. The last stage is the
layer's output. Nothing here says how to differentiate: :mod:`symbp.derivation` works that out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits

# Symbolic sizes shared by every layer: the batch and the usual feature axes.
N = sp.Symbol("N", integer=True, positive=True)


def size(name: str) -> sp.Symbol:
    """A symbolic size (a width, a channel count)."""
    return sp.Symbol(name, integer=True, positive=True)


def index(name: str) -> sp.Symbol:
    """An index symbol."""
    return sp.Symbol(name, integer=True)


@dataclass(frozen=True)
class Array:
    """An array of the layer, with a symbolic size for each axis (no axes: a scalar)."""

    name: str
    dims: tuple[sp.Symbol, ...]
    positive: bool = False
    #: integer values (an embedding's ids): read as indices, never differentiated
    integer: bool = False

    @cached_property
    def base(self) -> sp.IndexedBase | sp.Symbol:
        kind = {"integer": True, "nonnegative": True} if self.integer else {"real": True}
        if not self.dims:
            return sp.Symbol(self.name, **kind, positive=self.positive or None)
        return sp.IndexedBase(self.name, **kind, positive=self.positive or None)

    def __getitem__(self, indices) -> sp.Expr:
        if not isinstance(indices, tuple):
            indices = (indices,)
        if len(indices) != len(self.dims):
            raise ValueError(f"{self.name} has {len(self.dims)} axes, got {len(indices)} indices")
        return self.base if not indices else self.base[indices]

    @property
    def rank(self) -> int:
        return len(self.dims)


@dataclass(frozen=True)
class Stage:
    """``array[indices] = expr``: one named step of the forward pass."""

    array: Array
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr

    @property
    def name(self) -> str:
        return self.array.name


@dataclass
class Forward:
    """A layer's forward computation in index notation, with symbolic sizes.

    ``keep`` names what the backward pass may read from the forward pass besides the inputs and
    parameters it needs anyway; ``None`` lets the engine choose (for element-wise layers it
    prefers the output when the derivative is cheaper in terms of it, as for sigmoid).
    ``constants`` are hyper-parameter symbols (``eps``, a leaky ``slope``) with their values.
    ``letters`` names the index used for each size, for readable formulas.
    """

    inputs: tuple[Array, ...]
    params: tuple[Array, ...]
    stages: tuple[Stage, ...]
    aux: tuple[Array, ...] = ()
    constants: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)
    keep: tuple[str, ...] | None = None
    letters: dict[sp.Symbol, str] = field(default_factory=dict)
    elementwise: bool = False
    #: sizes computed from others (a convolution's output height), for concrete checks
    size_rules: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)
    #: sizes that are window lengths (kernel extents) for compound indices
    window_dims: frozenset = frozenset()
    #: compute the input gradient in its gather form (a full convolution: windows of the
    #: zero-padded upstream gradient against the flipped kernel) instead of as a scatter-add;
    #: chosen per layer at its concrete sizes, the formula is the same
    gather: bool = False
    #: intermediate stages whose gradient the backward computes once, as a named array that
    #: the other gradients read (the staged chain rule kept where inlining it would repeat
    #: work: attention's ``dq``, ``dk``, ``dv``), in place of substituting it
    through: tuple[str, ...] = ()
    #: per-sample sizes to prove the derivation at, where the verifier's defaults would take
    #: minutes (the scalar expansion of attention grows with T^2 * D * heads * E)
    proof_sizes: dict[sp.Symbol, int] = field(default_factory=dict)

    @property
    def output(self) -> Stage:
        return self.stages[-1]

    @property
    def arrays(self) -> dict[str, Array]:
        arrays = {a.name: a for a in self.inputs + self.params + self.aux}
        arrays.update({s.name: s.array for s in self.stages})
        return arrays

    @property
    def differentiable(self) -> tuple[Array, ...]:
        """The inputs and parameters, less integer inputs (an embedding's ids)."""
        return tuple(a for a in self.inputs if not a.integer) + self.params

    def indices_for(self, array: Array) -> tuple[sp.Symbol, ...]:
        """Canonical index names for an array's axes (``x[n, i]``, ``W[i, j]``)."""
        used: list[str] = []
        result = []
        for dim in array.dims:
            name = self.letters.get(dim) or getattr(dim, "name", "k").lower()
            while name in used:
                name += "'"
            used.append(name)
            result.append(index(name))
        return tuple(result)


class WindowMax(ExprWithLimits):
    """``max`` of ``function`` over its limits, e.g. a max-pooling window.

    Its derivative is sympy-style calculus on the primitive, as ``Max`` has in sympy: the
    derivative of a maximum is the derivative of the term that attains it, so
    ``d max_k f(k) = Sum_k [k is the first arg-max] * d f(k)`` (ties go to the first, as
    PyTorch's max pooling routes them).
    """

    is_real = True

    def _eval_derivative(self, symbol):
        indicator = FirstArgmax(self, *self.variables)
        return sp.Sum(indicator * sp.diff(self.function, symbol), *self.limits)


class FirstArgmax(sp.Function):
    """1 where the point ``(i, j, ...)`` is the first arg-max of the ``WindowMax``, else 0."""

    is_real = True

    def fdiff(self, argindex=1):
        return sp.Integer(0)  # piecewise constant


class WindowArgmax(ExprWithLimits):
    """The row-major position ``i*K_w + j`` of the first arg-max of ``function`` over its limits
    (a max-pooling window's, ties and NaNs as :class:`FirstArgmax` takes them): what a forward
    pass keeps in place of the window when the backward reads the window only through
    ``FirstArgmax``. Not differentiated (an integer)."""

    is_integer = True


class ArgmaxAt(sp.Function):
    """``ArgmaxAt(a, i, j, K_h, K_w)``: 1 where ``a = i*K_w + j``, else 0 -- ``FirstArgmax`` of a
    window read from the window's kept arg-max position ``a`` (a :class:`WindowArgmax`)."""

    is_real = True

    def fdiff(self, argindex=1):
        return sp.Integer(0)  # piecewise constant
