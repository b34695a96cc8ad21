"""Layer types: each one registered class holding its parameters and its forward definition.

Registering a class (``@register``) makes its ``kind`` available to the Python API, the TOML
loader, the derivation engine, both printers and the command line. A layer type declares only its
forward computation (:meth:`Layer.forward_form`, in index notation); its backward pass is derived.

Shapes here are per sample (batch excluded): ``(features,)`` for the dense layers.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import sympy as sp

from ..errors import SpecError
from ..naming import check_identifier
from .expr import parse_expression
from .forms import Array, Forward, N, Stage, index, size

REGISTRY: dict[str, type[Layer]] = {}

#: The scalar variable that activation expressions are written in.
X = sp.Symbol("x", real=True)

# Feature sizes used by the dense layers' forward definitions.
F = size("F")
F_IN = size("I")
F_OUT = size("O")
#: per-sample sizes of images (channels, height, width), as the image layers name them
IMAGE_DIMS = (size("C"), size("H_in"), size("W_in"))
LETTERS = {N: "n", F: "j", F_IN: "i", F_OUT: "j", **dict(zip(IMAGE_DIMS, "chw", strict=True))}


def register(cls: type[Layer]) -> type[Layer]:
    REGISTRY[cls.kind] = cls
    return cls


def _number(value: Any, *, field: str, positive: bool = False, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"must be a number, got {value!r}", field=field)
    if not abs(value) <= sys.float_info.max:  # nan, inf, or an integer beyond float64
        raise SpecError(f"must be a finite number, got {value!r}", field=field)
    if positive and not value > 0:
        raise SpecError(f"must be positive, got {value!r}", field=field)
    if minimum is not None and value < minimum:
        raise SpecError(f"must be at least {minimum}, got {value!r}", field=field)
    return float(value)


def _integer(value: Any, *, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"must be a positive integer, got {value!r}", field=field)
    return value


def exact(value: float) -> sp.Expr:
    """A float hyper-parameter as an exact rational (``0.01`` -> ``1/100``)."""
    return sp.Rational(repr(float(value)))


class Layer:
    """A layer of a network. Subclasses set ``kind`` and define :meth:`forward_form`."""

    kind: ClassVar[str]
    #: what an initializer must do for each parameter: "fan", "zeros", "ones" or a number
    init: ClassVar[dict[str, Any]] = {}

    # What differs between layer types, declared here and read by the network plan
    # (symbp.derive.plan) and every output target; nothing outside symbp.declare tests a kind.
    #: an activation (element-wise ``y = f(x)``): the notes list its derivative
    activation: ClassVar[bool] = False
    #: weights feeding this activation are drawn with He's gain (2 / fan_in, PyTorch's
    #: ``kaiming_normal_``) instead of Glorot's (2 / (fan_in + fan_out))
    he_gain_before: ClassVar[bool] = False
    #: an initializer looks through this layer for the activation after it (batch norm)
    init_looks_through: ClassVar[bool] = False
    #: arrays the training forward returns besides output and cache, for :meth:`state_updates`
    train_returns: ClassVar[tuple[str, ...]] = ()
    #: fewest values each training statistic averages (batch norm: 2, an unbiased variance),
    #: and what the error says when a batch has fewer
    min_values_per_statistic: ClassVar[int] = 1
    too_few_values: ClassVar[str] = ""
    #: the docstring of the generated state update (see :meth:`state_updates`)
    state_update_doc: ClassVar[str] = "Move the running state towards the batch's."
    #: each state array's initial value (:meth:`state_shapes`)
    state_initial: ClassVar[dict[str, float]] = {}
    #: what the generated module's docstrings say this layer does in training and in evaluation
    #: mode, where the two differ (:meth:`eval_form`)
    training_doc: ClassVar[str] = ""
    evaluation_doc: ClassVar[str] = ""

    def __init__(self, *, name: str | None = None) -> None:
        self.name = None if name is None else check_identifier(name, what="layer name")

    # -- shapes -------------------------------------------------------------------------------
    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {}

    # -- math ---------------------------------------------------------------------------------
    def forward_form(self, in_shape: tuple[int, ...]) -> Forward:
        raise NotImplementedError

    def eval_form(self, in_shape: tuple[int, ...]) -> Forward | None:
        """The evaluation-mode forward, where it differs from training (batchnorm, rrelu)."""
        return None

    def constant_values(self) -> dict[str, float]:
        """Values of the hyper-parameter symbols used in :meth:`forward_form`."""
        return {}

    def math_key(self, in_shape: tuple[int, ...]) -> tuple:
        """Layers with equal keys share one derivation (their sizes are symbolic)."""
        return (self.kind, len(in_shape))

    @property
    def function_stem(self) -> str:
        """The stem of the generated function names for this layer's math."""
        return self.kind

    def stem_for(self, in_shape: tuple[int, ...]) -> str:
        """:attr:`function_stem` for this layer on inputs of ``in_shape`` (a way of computing
        chosen at concrete sizes may add to it)."""
        return self.function_stem

    def describe(self) -> str:
        return self.kind

    def title(self, placed_name: str) -> str:
        """What the notes call this layer's math (a user activation: the layer's name)."""
        return self.kind

    # -- state and randomness ---------------------------------------------------------------
    def state_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Running state kept between training steps (batch norm's running statistics)."""
        return {}

    def state_updates(self) -> dict[str, sp.Expr]:
        """Each state array's new value (scalar form) from :attr:`train_returns` and ``N``."""
        return {}

    def statistics_over(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The axes (batch axis 0 included) that each training statistic averages over."""
        return ()

    def draws(self) -> dict[str, tuple[str, tuple[float, ...]]]:
        """Auxiliary inputs drawn at random in training: name -> (``numpy.random.Generator``
        method, its arguments); rrelu: ``{"r": ("uniform", (lower, upper))}``."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _dense_arrays(in_shape: tuple[int, ...]) -> tuple[Array, tuple[sp.Symbol, ...]]:
    if len(in_shape) != 1:
        raise SpecError(f"expects feature vectors, got a per-sample shape {in_shape}")
    return Array("x", (N, F)), (index("n"), index("j"))


@register
class Linear(Layer):
    """``z = x @ W + b`` with ``W`` of shape (in, out) and ``b`` of shape (out,)."""

    kind = "linear"
    init = {"W": "fan", "b": "zeros"}

    def __init__(self, out: int, *, bias: bool = True, name: str | None = None) -> None:
        super().__init__(name=name)
        self.out = _integer(out, field="out")
        if not isinstance(bias, bool):
            raise SpecError(f"must be true or false, got {bias!r}", field="bias")
        self.bias = bias

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise SpecError(
                f"linear expects feature vectors but gets per-sample shape {list(in_shape)}; "
                "put a flatten layer before it"
            )
        return (self.out,)

    def param_shapes(self, in_shape):
        shapes = {"W": (in_shape[0], self.out)}
        if self.bias:
            shapes["b"] = (self.out,)
        return shapes

    def forward_form(self, in_shape):
        x, W, b = Array("x", (N, F_IN)), Array("W", (F_IN, F_OUT)), Array("b", (F_OUT,))
        n, i, j = index("n"), index("i"), index("j")
        z = sp.Sum(x[n, i] * W[i, j], (i, 0, F_IN - 1))
        params = (W, b) if self.bias else (W,)
        if self.bias:
            z = z + b[j]
        return Forward(
            inputs=(x,),
            params=params,
            stages=(Stage(Array("z", (N, F_OUT)), (n, j), z),),
            keep=("x",),
            letters=LETTERS,
        )

    def math_key(self, in_shape):
        return (self.kind, self.bias)

    @property
    def function_stem(self):
        return "linear" if self.bias else "linear_nobias"

    def describe(self):
        return f"linear(out={self.out})"


@register
class BatchNorm(Layer):
    """Batch normalization per feature over the batch (PyTorch's BatchNorm1d semantics).

    Training: ``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with the batch mean and the
    biased batch variance; the running mean and the running *unbiased* variance move by
    ``momentum``. Evaluation: the running statistics replace the batch ones.
    """

    kind = "batchnorm"
    init = {"gamma": "ones", "beta": "zeros"}
    init_looks_through = True
    train_returns = ("mu", "var")
    min_values_per_statistic = 2
    too_few_values = "batch norm needs more than one value per channel to train"
    state_update_doc = "Move the running statistics towards the batch's (unbiased variance)."
    state_initial = {"running_mean": 0.0, "running_var": 1.0}
    training_doc = (
        "In training mode batch norm uses the batch statistics and, when ``state`` is given, "
        "moves its running statistics in place; in evaluation mode ``state`` holds them."
    )
    evaluation_doc = "batch norm uses the running statistics in ``state``"
    EPS = sp.Symbol("epsilon", positive=True)
    MOMENTUM = sp.Symbol("momentum", positive=True)

    def __init__(self, *, eps: float = 1e-5, momentum: float = 0.1, name: str | None = None):
        super().__init__(name=name)
        self.eps = _number(eps, field="eps", positive=True)
        self.momentum = _number(momentum, field="momentum", positive=True)
        if self.momentum > 1:
            raise SpecError(f"must be in (0, 1], got {momentum!r}", field="momentum")

    def output_shape(self, in_shape):
        if len(in_shape) not in (1, 3):
            raise SpecError(
                f"batchnorm expects feature vectors or images (C, H, W), got {list(in_shape)}"
            )
        return in_shape

    def param_shapes(self, in_shape):
        return {"gamma": in_shape[:1], "beta": in_shape[:1]}

    def state_shapes(self, in_shape) -> dict[str, tuple[int, ...]]:
        return {"running_mean": in_shape[:1], "running_var": in_shape[:1]}

    def statistics_over(self, in_shape):
        return (0, *range(2, len(in_shape) + 1))  # every axis but the feature (channel) axis

    def constant_values(self):
        return {"epsilon": self.eps, "momentum": self.momentum}

    @staticmethod
    def _layout(in_shape):
        """(dims, per-element indices, feature position, batch-like indices to reduce over)."""
        if len(in_shape) == 1:
            return (N, F), (index("n"), index("j")), 1
        C, H, W = size("C"), size("H_in"), size("W_in")
        return (N, C, H, W), (index("n"), index("c"), index("h"), index("w")), 1

    def forward_form(self, in_shape):
        dims, idx, feature = self._layout(in_shape)
        channel, channels = idx[feature], dims[feature]
        x, gamma, beta = Array("x", dims), Array("gamma", (channels,)), Array("beta", (channels,))
        mu, var = Array("mu", (channels,)), Array("var", (channels,))
        invstd, xhat = Array("invstd", (channels,), positive=True), Array("xhat", dims)
        # The statistics run over every axis but the feature (channel) axis.
        bound = [index({"n": "m", "h": "r", "w": "s"}[i.name]) for i in idx if i != channel]
        reduced = [i for i in idx if i != channel]
        at = dict(zip(reduced, bound, strict=True))
        element = x[tuple(at.get(i, i) for i in idx)]
        limits = [(b, 0, d - 1) for b, d in zip(bound, [d for d in dims if d != channels],
                                                strict=True)]
        count = sp.Mul(*[d for d in dims if d != channels])
        eps = self.EPS
        stages = (
            Stage(mu, (channel,), sp.Sum(element, *limits) / count),
            Stage(var, (channel,), sp.Sum((element - mu[channel]) ** 2, *limits) / count),
            Stage(invstd, (channel,), 1 / sp.sqrt(var[channel] + eps)),
            Stage(xhat, idx, (x[idx] - mu[channel]) * invstd[channel]),
            Stage(Array("y", dims), idx, gamma[channel] * xhat[idx] + beta[channel]),
        )
        letters = {N: "n", F: "j", size("C"): "c", size("H_in"): "h", size("W_in"): "w"}
        return Forward(
            inputs=(x,),
            params=(gamma, beta),
            stages=stages,
            constants={eps: exact(self.eps)},
            keep=("xhat", "invstd"),
            letters=letters,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))

    @property
    def function_stem(self):
        return "batchnorm"

    def eval_form(self, in_shape):
        dims, idx, feature = self._layout(in_shape)
        channel, channels = idx[feature], dims[feature]
        x, gamma, beta = Array("x", dims), Array("gamma", (channels,)), Array("beta", (channels,))
        mean, var = Array("running_mean", (channels,)), Array("running_var", (channels,))
        y = (
            gamma[channel] * (x[idx] - mean[channel]) / sp.sqrt(var[channel] + self.EPS)
            + beta[channel]
        )
        return Forward(
            inputs=(x,),
            params=(gamma, beta),
            aux=(mean, var),
            stages=(Stage(Array("y", dims), idx, y),),
            constants={self.EPS: exact(self.eps)},
            letters={N: "n", F: "j", size("C"): "c", size("H_in"): "h", size("W_in"): "w"},
        )

    def state_updates(self) -> dict[str, sp.Expr]:
        """New running statistics from the batch's ``mu`` and biased ``var`` (scalar form)."""
        mom = self.MOMENTUM
        mean, var = sp.Symbol("running_mean"), sp.Symbol("running_var")
        batch_mean, batch_var = sp.Symbol("mu"), sp.Symbol("var")
        return {
            "running_mean": (1 - mom) * mean + mom * batch_mean,
            "running_var": (1 - mom) * var + mom * batch_var * N / (N - 1),
        }

    def describe(self):
        return "batchnorm"


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
        rank = len(in_shape) + 1
        dims = (N, F) if rank == 2 else (N, *IMAGE_DIMS[: rank - 1])
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
    constants = {"slope": sp.Symbol("a", positive=True)}

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


@register
class Residual(Layer):
    """``y = x + F(x)`` where ``F`` is a list of layers that must keep the width."""

    kind = "residual"

    def __init__(self, layers: list[Layer], *, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(layers, list | tuple) or not layers:
            raise SpecError("must be a non-empty list of layers", field="layers")
        for layer in layers:
            if not isinstance(layer, Layer) or isinstance(layer, Loss):
                raise SpecError(f"{layer!r} is not a layer", field="layers")
        self.layers = list(layers)

    def forward_form(self, in_shape):
        dims = (N, F) if len(in_shape) == 1 else (N, *IMAGE_DIMS)
        idx = tuple(index(LETTERS[d]) for d in dims)
        x, f = Array("x", dims), Array("f", dims)
        return Forward(
            inputs=(x, f),
            params=(),
            stages=(Stage(Array("y", dims), idx, x[idx] + f[idx]),),
            keep=(),
            letters=LETTERS,
            elementwise=True,
        )

    @property
    def function_stem(self):
        return "residual_add"

    def describe(self):
        return "residual(" + ", ".join(layer.describe() for layer in self.layers) + ")"


class Loss(Layer):
    """A loss: reduces the network output ``z`` and targets to a scalar."""

    #: "labels" (integer class per sample) or "targets" (same shape as the output)
    target_kind: ClassVar[str] = "targets"
    #: the closed range targets must lie in, where the loss needs one (probabilities)
    target_range: ClassVar[tuple[float, float] | None] = None

    def check_output(self, out_shape: tuple[int, ...]) -> None:
        if len(out_shape) != 1:
            raise SpecError(f"{self.kind} needs a feature-vector output, got {list(out_shape)}")


@register
class Mse(Loss):
    """Mean squared error, mean over all elements."""

    kind = "mse"

    def forward_form(self, in_shape):
        z, t = Array("z", (N, F)), Array("t", (N, F))
        n, j = index("n"), index("j")
        loss = sp.Sum((z[n, j] - t[n, j]) ** 2, (n, 0, N - 1), (j, 0, F - 1)) / (N * F)
        return Forward(
            inputs=(z,),
            params=(),
            aux=(t,),
            stages=(Stage(Array("L", ()), (), loss),),
            keep=(),
            letters=LETTERS,
        )


@register
class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy with integer labels, mean over the batch."""

    kind = "softmax_cross_entropy"
    target_kind = "labels"

    def check_output(self, out_shape):
        super().check_output(out_shape)
        if out_shape[0] < 2:
            raise SpecError(
                "softmax_cross_entropy needs at least 2 outputs (one per class); "
                "for one output use bce_with_logits"
            )

    def forward_form(self, in_shape):
        C = size("C")
        z, Y = Array("z", (N, C)), Array("Y", (N, C))
        lse = Array("lse", (N,))
        n, c = index("n"), index("c")
        stages = (
            Stage(lse, (n,), sp.log(sp.Sum(sp.exp(z[n, c]), (c, 0, C - 1)))),
            Stage(
                Array("L", ()),
                (),
                sp.Sum(lse[n] - sp.Sum(Y[n, c] * z[n, c], (c, 0, C - 1)), (n, 0, N - 1)) / N,
            ),
        )
        return Forward(
            inputs=(z,),
            params=(),
            aux=(Y,),
            stages=stages,
            keep=("lse",),
            letters={N: "n", C: "c"},
        )


@register
class BceWithLogits(Loss):
    """Binary cross-entropy on logits, mean over all elements (targets in [0, 1])."""

    kind = "bce_with_logits"
    target_range = (0.0, 1.0)

    def forward_form(self, in_shape):
        z, t = Array("z", (N, F)), Array("t", (N, F))
        n, j = index("n"), index("j")
        # -(t log s(z) + (1 - t) log(1 - s(z))) == log(1 + exp(z)) - t z, exactly.
        per_element = sp.log(1 + sp.exp(z[n, j])) - t[n, j] * z[n, j]
        loss = sp.Sum(per_element, (n, 0, N - 1), (j, 0, F - 1)) / (N * F)
        return Forward(
            inputs=(z,),
            params=(),
            aux=(t,),
            stages=(Stage(Array("L", ()), (), loss),),
            keep=(),
            letters=LETTERS,
        )


LOSSES = tuple(kind for kind, cls in REGISTRY.items() if issubclass(cls, Loss))
