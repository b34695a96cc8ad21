"""What the engine derives for one layer type: its adjoints, rules and kept values.

:class:`LayerDerivation` is built by :func:`symbp.derivation.layer.derive_layer`; the printers,
the proofs and the plan read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .. import naming
from ..declare.forms import Array, Forward, Stage
from .arrays import Erfc, Sigmoid, Softplus


@dataclass
class Adjoint:
    """``d<name>[indices] = expr``: the gradient of the loss with respect to an array."""

    array: Array
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr

    @property
    def name(self) -> str:
        return naming.adjoint(self.array.name)

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
    (:func:`~symbp.derivation.stable.stabilize`); ``computed``, where given, is an equal index
    expression the forward pass computes it by instead (a softmax from shifted exponentials)."""

    computed: sp.Expr | None = None
    #: ``None``: the layer's float type; ``"bool"``: a 0/1 step; ``"index"``: a small unsigned
    #: integer (a window's arg-max position)
    dtype: str | None = None

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
    #: the gradients of the stages of ``form.through``, in the order the backward computes
    #: them (reverse stage order); ``vjp`` and each other read them by name
    through: dict[str, Adjoint] = field(default_factory=dict)

    #: a layer unrolled over time (:mod:`.unrolled`): the cell's derivation, else ``None``
    cell = None

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
    def param_names(self) -> tuple[str, ...]:
        """The names of the parameters (read where they are, never cached)."""
        return tuple(p.name for p in self.form.params)

    @property
    def params_read(self) -> tuple[Array, ...]:
        """The parameters the code's VJPs read."""
        reads = self.stored if self.code_reads is None else self.code_reads
        return tuple(p for p in self.form.params if p.name in reads)

    @property
    def kept_storage(self) -> dict[str, Array]:
        """Kept arrays (and the output) that the generated code holds as views of another
        array, by name: that array (a layer unrolled over time keeps each state before and
        after the steps as views of one ``(T + 1, N, H)`` array, and its steps' inputs as its
        input). None by default."""
        return {}


def adjoint_array(array: Array) -> Array:
    return Array(naming.adjoint(array.name), array.dims)



def as_math(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the stable nodes written out: ``sigmoid(u) = 1/(1 + exp(-u))``,
    ``softplus(u) = log(1 + exp(u))``, ``erfc(-u)`` as it is."""
    expr = expr.replace(lambda e: isinstance(e, Sigmoid), lambda e: 1 / (1 + sp.exp(-e.args[0])))
    expr = expr.replace(lambda e: isinstance(e, Erfc), lambda e: sp.erfc(*e.args, evaluate=False))
    return expr.replace(lambda e: isinstance(e, Softplus), lambda e: sp.log(1 + sp.exp(e.args[0])))
