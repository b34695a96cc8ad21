"""Layer types: each one registered class holding its parameters and its forward definition.

This module holds the dense layers (linear, batch norm) and the residual block, and gathers the
declarations of :mod:`.base` (``Layer``, ``register``), :mod:`.activations` and :mod:`.losses`
under one name; the image layers are in :mod:`.conv`.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .activations import (
    ACTIVATIONS,
    Activation,
    Elementwise,
    Elu,
    Gelu,
    LeakyRelu,
    Prelu,
    Relu,
    Rrelu,
    Sigmoid,
    Silu,
    Softplus,
    Tanh,
)
from .base import (
    F_IN,
    F_OUT,
    IMAGE_DIMS,
    LETTERS,
    MAX_ELEMENTS,
    REGISTRY,
    SEQ_DIMS,
    F,
    Layer,
    X,
    _integer,
    _number,
    exact,
    register,
    sample_dims,
    shown,
)
from .forms import Array, Forward, N, Stage, index, size
from .losses import LOSSES, BceWithLogits, Loss, Mse, SoftmaxCrossEntropy

__all__ = [
    "ACTIVATIONS", "MAX_ELEMENTS", "F", "F_IN", "F_OUT", "IMAGE_DIMS", "LETTERS", "LOSSES",
    "REGISTRY", "X",
    "Activation", "BatchNorm", "BceWithLogits", "Elementwise", "Elu", "Gelu", "Layer",
    "LeakyRelu", "Linear", "Loss", "Mse", "Prelu", "Relu", "Residual", "Rrelu", "Sigmoid", "Silu",
    "SoftmaxCrossEntropy", "Softplus", "Tanh", "_integer", "_number", "exact", "register", "shown",
]


def _dense_arrays(in_shape: tuple[int, ...]) -> tuple[Array, tuple[sp.Symbol, ...]]:
    if len(in_shape) != 1:
        raise SpecError(f"expects feature vectors, got a per-sample shape {in_shape}")
    return Array("x", (N, F)), (index("n"), index("j"))


@register
class Linear(Layer):
    """``z = x @ W + b`` with ``W`` of shape (in, out) and ``b`` of shape (out,).

    On sequences ``(T, D)`` it acts on each position's features, the last axis (PyTorch's
    ``nn.Linear`` on a 3-D tensor): ``z[n, t, j] = sum_i x[n, t, i] W[i, j] + b[j]``.
    """

    kind = "linear"
    init = {"W": "fan", "b": "zeros"}
    decayed = ("W",)

    def __init__(self, out: int, *, bias: bool = True, name: str | None = None) -> None:
        super().__init__(name=name)
        self.out = _integer(out, field="out")
        if not isinstance(bias, bool):
            raise SpecError(f"must be true or false, got {bias!r}", field="bias")
        self.bias = bias

    def output_shape(self, in_shape):
        if len(in_shape) not in (1, 2):
            raise SpecError(
                f"linear expects feature vectors or sequences (T, D) but gets per-sample shape "
                f"{list(in_shape)}; put a flatten layer before it"
            )
        return (*in_shape[:-1], self.out)

    def param_shapes(self, in_shape):
        shapes = {"W": (in_shape[-1], self.out)}
        if self.bias:
            shapes["b"] = (self.out,)
        return shapes

    def forward_form(self, in_shape):
        W, b = Array("W", (F_IN, F_OUT)), Array("b", (F_OUT,))
        i, j = index("i"), index("j")
        # the positions a sequence's features sit at (none for feature vectors)
        rows = (index("n"),) if len(in_shape) == 1 else (index("n"), index("t"))
        lead = (N,) if len(in_shape) == 1 else (N, SEQ_DIMS[0])
        x = Array("x", (*lead, F_IN))
        z = sp.Sum(x[(*rows, i)] * W[i, j], (i, 0, F_IN - 1))
        params = (W, b) if self.bias else (W,)
        if self.bias:
            z = z + b[j]
        return Forward(
            inputs=(x,),
            params=params,
            stages=(Stage(Array("z", (*lead, F_OUT)), (*rows, j), z),),
            keep=("x",),
            letters=LETTERS,
        )

    def math_key(self, in_shape):
        return (self.kind, self.bias) if len(in_shape) == 1 else (self.kind, self.bias, "seq")

    @property
    def function_stem(self):
        return "linear" if self.bias else "linear_nobias"

    def stem_for(self, in_shape):
        return self.function_stem + ("_seq" if len(in_shape) == 2 else "")

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
    EPS = sp.Symbol("eps", positive=True)  # named as the user writes it
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
        return {"eps": self.eps, "momentum": self.momentum}

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
        dims = sample_dims(in_shape)
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
