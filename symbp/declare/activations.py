"""Element-wise layers (activations): ``y = f(x)`` with ``f`` a sympy expression in ``x``.

Each is one registered class; its derivative is derived, never written down. A user activation
(:class:`Activation`) is any expression in ``x``, parsed safely.
"""

from __future__ import annotations

from typing import ClassVar

import sympy as sp

from ..errors import SpecError
from .base import (
    LETTERS,
    REGISTRY,
    F,
    Layer,
    X,
    _number,
    exact,
    register,
    sample_dims,
)
from .expr import parse_expression
from .forms import Array, Forward, N, Stage, index


class Elementwise(Layer):
    """``y = f(x)`` applied to every element; ``f`` is a sympy expression in :data:`X`."""

    #: hyper-parameter symbols of ``f`` and the names of their constructor arguments
    constants: ClassVar[dict[str, sp.Symbol]] = {}
    activation = True

    def expression(self) -> sp.Expr:
        raise NotImplementedError

    def params_form(self) -> tuple[tuple[Array, ...], dict[sp.Symbol, sp.Expr]]:
        """Parameters of ``f`` (PReLU's slope) and how ``f``'s symbols map onto them."""
        return (), {}

    def aux_form(self) -> tuple[tuple[Array, ...], dict[sp.Symbol, sp.Expr]]:
        """Auxiliary per-element inputs (RReLU's random slopes)."""
        return (), {}

    def aux_ranges(self) -> dict[str, tuple[sp.Expr, sp.Expr]]:
        """The closed range of each auxiliary input, in the layer's constants, where known."""
        return {}

    def constant_values(self):
        return {symbol.name: getattr(self, attr) for attr, symbol in self.constants.items()}

    def forward_form(self, in_shape):
        dims = sample_dims(in_shape)
        idx = tuple(index(LETTERS[d]) for d in dims)
        x = Array("x", dims)
        params, param_subs = self.params_form()
        aux, aux_subs = self.aux_form()
        subs = {X: x[idx]}
        subs.update({s: (v if not isinstance(v, Array) else v[idx]) for s, v in aux_subs.items()})
        subs.update(param_subs)
        expr = self.expression().xreplace(subs)
        return Forward(
            inputs=(x,),
            params=params,
            aux=aux,
            stages=(Stage(Array("y", dims), idx, expr),),
            constants={s: exact(getattr(self, a)) for a, s in self.constants.items()},
            letters=LETTERS,
            elementwise=True,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))


def _activation(
    kind: str, expression: sp.Expr, doc: str, *, he_gain_before: bool = False
) -> type[Elementwise]:
    cls = type(
        kind.capitalize(),
        (Elementwise,),
        {
            "kind": kind,
            "expression": lambda self: expression,
            "__doc__": doc,
            "he_gain_before": he_gain_before,
        },
    )
    return register(cls)


Sigmoid = _activation("sigmoid", 1 / (1 + sp.exp(-X)), "``1 / (1 + exp(-x))``")
Tanh = _activation("tanh", sp.tanh(X), "``tanh(x)``")
Relu = _activation(
    "relu", sp.Max(0, X), "``max(0, x)``; ReLU'(0) = 0 by convention", he_gain_before=True
)
Softplus = _activation("softplus", sp.log(1 + sp.exp(X)), "``log(1 + exp(x))``")
Silu = _activation("silu", X / (1 + sp.exp(-X)), "``x * sigmoid(x)``")
Gelu = _activation("gelu", X * (1 + sp.erf(X / sp.sqrt(2))) / 2, "exact GELU, erf form")


@register
class LeakyRelu(Elementwise):
    """``x`` for x > 0, ``slope * x`` otherwise (slope 0.01 by default)."""

    kind = "leaky_relu"
    he_gain_before = True
    constants = {"slope": sp.Symbol("slope", positive=True)}

    def __init__(self, slope: float = 0.01, *, name: str | None = None):
        super().__init__(name=name)
        self.slope = _number(slope, field="slope", positive=True)

    def expression(self):
        return sp.Piecewise((X, X > 0), (self.constants["slope"] * X, True))


@register
class Elu(Elementwise):
    """``x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise (alpha 1.0 by default)."""

    kind = "elu"
    he_gain_before = True
    constants = {"alpha": sp.Symbol("alpha", positive=True)}

    def __init__(self, alpha: float = 1.0, *, name: str | None = None):
        super().__init__(name=name)
        self.alpha = _number(alpha, field="alpha", positive=True)

    def expression(self):
        return sp.Piecewise((X, X > 0), (self.constants["alpha"] * (sp.exp(X) - 1), True))


@register
class Prelu(Elementwise):
    """``x`` for x > 0, ``alpha * x`` otherwise, with a learnable slope ``alpha``.

    ``shared=True`` (default) learns one slope; ``shared=False`` one per feature.
    """

    kind = "prelu"
    he_gain_before = True
    SLOPE = sp.Symbol("alpha", real=True)

    def __init__(self, *, shared: bool = True, init: float = 0.25, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(shared, bool):
            raise SpecError(f"must be true or false, got {shared!r}", field="shared")
        self.shared = shared
        self.init_value = _number(init, field="init")

    @property
    def init(self):  # type: ignore[override]
        return {"alpha": self.init_value}

    def param_shapes(self, in_shape):
        return {"alpha": () if self.shared else in_shape[:1]}

    def expression(self):
        return sp.Piecewise((X, X > 0), (self.SLOPE * X, True))

    def params_form(self):
        if self.shared:
            alpha = Array("alpha", ())
            return (alpha,), {self.SLOPE: alpha.base}
        alpha = Array("alpha", (F,))
        return (alpha,), {self.SLOPE: alpha[index("j")]}

    def forward_form(self, in_shape):
        if not self.shared and len(in_shape) != 1:
            raise SpecError("a per-feature prelu needs feature vectors", field="shared")
        return super().forward_form(in_shape)

    def math_key(self, in_shape):
        return (self.kind, len(in_shape), self.shared)

    @property
    def function_stem(self):
        return "prelu" if self.shared else "prelu_per_feature"


@register
class Rrelu(Elementwise):
    """Randomized leaky ReLU: ``x`` for x > 0, ``r * x`` otherwise.

    In training ``r`` is drawn per element, uniformly from [lower, upper]; in evaluation it is
    ``(lower + upper) / 2``.
    """

    kind = "rrelu"
    he_gain_before = True
    SLOPE = sp.Symbol("r", positive=True)
    constants = {
        "lower": sp.Symbol("lower", positive=True),
        "upper": sp.Symbol("upper", positive=True),
    }

    def __init__(self, lower: float = 1 / 8, upper: float = 1 / 3, *, name: str | None = None):
        super().__init__(name=name)
        self.lower = _number(lower, field="lower", positive=True)
        self.upper = _number(upper, field="upper", positive=True)
        if self.upper < self.lower:
            raise SpecError(f"upper ({upper}) is below lower ({lower})", field="upper")

    def expression(self):
        return sp.Piecewise((X, X > 0), (self.SLOPE * X, True))

    def aux_form(self):
        return (Array("r", (N, F), positive=True),), {self.SLOPE: Array("r", (N, F), True)}

    def aux_ranges(self):
        return {"r": (self.constants["lower"], self.constants["upper"])}

    def draws(self):
        return {"r": ("uniform", (self.lower, self.upper))}

    training_doc = "``rng`` (a ``np.random.Generator``) draws the rrelu slopes in training mode."
    evaluation_doc = "rrelu uses the mean of its slope range"

    def forward_form(self, in_shape):
        if len(in_shape) != 1:
            raise SpecError("rrelu expects feature vectors")
        return super().forward_form(in_shape)

    def eval_form(self, in_shape):
        form = super().forward_form(in_shape)
        low, high = self.constants["lower"], self.constants["upper"]
        stage = form.output
        r = Array("r", (N, F), True)
        expr = stage.expr.xreplace({r[stage.indices]: (low + high) / 2})
        return Forward(
            inputs=form.inputs,
            params=(),
            stages=(Stage(stage.array, stage.indices, expr),),
            constants=form.constants,
            letters=form.letters,
            elementwise=True,
        )


@register
class Activation(Elementwise):
    """A user activation: any expression in ``x`` (parsed safely, see :mod:`.expr`)."""

    kind = "activation"

    def __init__(self, expr: str, *, name: str | None = None):
        super().__init__(name=name)
        try:
            self.expr = parse_expression(expr, variable=X)
        except SpecError as err:
            raise err.located(field="expr") from None
        self.text = expr

    def expression(self):
        return self.expr

    def math_key(self, in_shape):
        return (self.kind, len(in_shape), sp.srepr(self.expr))

    @property
    def function_stem(self):
        return self.name or "activation"

    def describe(self):
        return f"activation({self.text})"

    def title(self, placed_name):
        return placed_name


ACTIVATIONS = tuple(kind for kind, cls in REGISTRY.items() if issubclass(cls, Elementwise))
