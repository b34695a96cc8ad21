"""The canon: layer norm, group norm, softmax and log-softmax along the features, global
average pooling, dropout.

Each is one registered class declaring its forward pass in index notation, like every other
layer; every backward pass, compact form and stable rewrite is derived by
:mod:`symbp.derivation` (no derivative is written here).
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .activations import Elementwise
from .base import (
    IMAGE_DIMS,
    LETTERS,
    SEQ_DIMS,
    F,
    Layer,
    X,
    _integer,
    _number,
    exact,
    register,
    sample_dims,
)
from .forms import Array, Forward, N, Stage, index

C, H, W = IMAGE_DIMS


def _sample_layout(in_shape):
    """The input's dims and per-element indices, and each per-sample index's bound partner
    (``j`` -> ``k``, ``c`` -> ``k``, ``h`` -> ``r``, ``w`` -> ``s``) for sums over a sample."""
    if len(in_shape) == 1:
        return (N, F), (index("n"), index("j")), (index("k"),)
    if len(in_shape) == 3:
        idx = (index("n"), index("c"), index("h"), index("w"))
        return (N, C, H, W), idx, (index("k"), index("r"), index("s"))
    if len(in_shape) == 2:  # a sequence: each position's features (the last axis)
        idx = (index("n"), index("t"), index("d"))
        return (N, *SEQ_DIMS), idx, (index("k"),)
    raise SpecError(
        f"expects feature vectors, sequences (T, D) or images (C, H, W), got {list(in_shape)}"
    )


@register
class LayerNorm(Layer):
    """Layer normalization over each sample's features (PyTorch's ``nn.LayerNorm``).

    ``y = gamma * (x - mu) / sqrt(var + eps) + beta``, ``mu`` and the biased ``var`` taken over
    one sample's features: the last axis of feature vectors ``(F,)``, the whole ``(C, H, W)`` of
    an image (``nn.LayerNorm([C, H, W])``); ``gamma`` and ``beta`` have the sample's shape. On a
    sequence ``(T, D)`` each position is normalised over its ``D`` features alone, as in a
    transformer (``nn.LayerNorm(D)``), with ``gamma`` and ``beta`` of shape ``(D,)``.
    The same in training and evaluation: no running state.
    """

    kind = "layer_norm"
    init = {"gamma": "ones", "beta": "zeros"}
    init_looks_through = True
    EPS = sp.Symbol("eps", positive=True)  # named as the user writes it

    def __init__(self, *, eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.eps = _number(eps, field="eps", positive=True)

    def output_shape(self, in_shape):
        _sample_layout(in_shape)
        return in_shape

    def param_shapes(self, in_shape):
        shape = tuple(in_shape[-1:] if len(in_shape) == 2 else in_shape)
        return {"gamma": shape, "beta": shape}

    def constant_values(self):
        return {"eps": self.eps}

    def forward_form(self, in_shape):
        dims, idx, bound = _sample_layout(in_shape)
        # the statistics are per row: per sample, or per position of a sequence
        rows = 2 if len(in_shape) == 2 else 1
        n, features = idx[:rows], dims[rows:]
        x = Array("x", dims)
        gamma, beta = Array("gamma", features), Array("beta", features)
        mu, var = Array("mu", dims[:rows]), Array("var", dims[:rows])
        invstd, xhat = Array("invstd", dims[:rows], positive=True), Array("xhat", dims)
        element = x[(*n, *bound)]
        limits = [(b, 0, d - 1) for b, d in zip(bound, features, strict=True)]
        count = sp.Mul(*features)
        stages = (
            Stage(mu, n, sp.Sum(element, *limits) / count),
            Stage(var, n, sp.Sum((element - mu[n]) ** 2, *limits) / count),
            Stage(invstd, n, 1 / sp.sqrt(var[n] + self.EPS)),
            Stage(xhat, idx, (x[idx] - mu[n]) * invstd[n]),
            Stage(Array("y", dims), idx, gamma[idx[rows:]] * xhat[idx] + beta[idx[rows:]]),
        )
        return Forward(
            inputs=(x,),
            params=(gamma, beta),
            stages=stages,
            constants={self.EPS: exact(self.eps)},
            keep=("xhat", "invstd"),
            letters=LETTERS,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))

    def describe(self):
        return "layer_norm" if self.eps == 1e-5 else f"layer_norm(eps={self.eps!r})"


@register
class GroupNorm(Layer):
    """Group normalization of images (PyTorch's ``nn.GroupNorm(groups, C)``).

    The ``C`` channels fall into ``groups`` groups of ``C/groups`` consecutive channels; ``mu``
    and the biased ``var`` are taken per sample over a group's channels and the whole ``H x W``,
    then ``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with ``gamma`` and ``beta`` per
    channel. The same in training and evaluation: no running state.
    """

    kind = "group_norm"
    init = {"gamma": "ones", "beta": "zeros"}
    init_looks_through = True
    EPS = sp.Symbol("eps", positive=True)  # named as the user writes it
    GROUPS = sp.Symbol("groups", integer=True, positive=True)

    def __init__(self, groups: int, *, eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.groups = _integer(groups, field="groups")
        self.eps = _number(eps, field="eps", positive=True)

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise SpecError(
                f"group_norm expects images (C, H, W), got per-sample shape {list(in_shape)}"
            )
        if in_shape[0] % self.groups:
            raise SpecError(f"{self.groups} groups do not divide the {in_shape[0]} channels",
                            field="groups")
        return in_shape

    def param_shapes(self, in_shape):
        return {"gamma": tuple(in_shape[:1]), "beta": tuple(in_shape[:1])}

    def constant_values(self):
        return {"eps": self.eps, "groups": self.groups}

    def forward_form(self, in_shape):
        self.output_shape(in_shape)
        n, c, h, w = idx = tuple(index(s) for s in "nchw")
        g, k, r, s = (index(s) for s in "gkrs")
        per_group = C / self.GROUPS
        group = sp.floor(c / per_group)  # the group of channel c
        x, dims = Array("x", (N, C, H, W)), (N, C, H, W)
        gamma, beta = Array("gamma", (C,)), Array("beta", (C,))
        mu, var = Array("mu", (N, self.GROUPS)), Array("var", (N, self.GROUPS))
        invstd = Array("invstd", (N, self.GROUPS), positive=True)
        xhat = Array("xhat", dims)
        # the elements of group g: channel k of the sample where floor(k / (C/groups)) = g
        in_group = sp.KroneckerDelta(sp.floor(k / per_group), g)
        element = in_group * x[n, k, r, s]
        limits = [(k, 0, C - 1), (r, 0, H - 1), (s, 0, W - 1)]
        count = per_group * H * W
        stages = (
            Stage(mu, (n, g), sp.Sum(element, *limits) / count),
            Stage(var, (n, g), sp.Sum(
                in_group * (x[n, k, r, s] - mu[n, sp.floor(k / per_group)]) ** 2,
                *limits) / count),
            Stage(invstd, (n, g), 1 / sp.sqrt(var[n, g] + self.EPS)),
            Stage(xhat, idx, (x[idx] - mu[n, group]) * invstd[n, group]),
            Stage(Array("y", dims), idx, gamma[c] * xhat[idx] + beta[c]),
        )
        return Forward(
            inputs=(x,),
            params=(gamma, beta),
            stages=stages,
            constants={self.EPS: exact(self.eps), self.GROUPS: sp.Integer(self.groups)},
            keep=("xhat", "invstd"),
            letters={**LETTERS, self.GROUPS: "g"},
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape), self.groups)

    def describe(self):
        eps = "" if self.eps == 1e-5 else f", eps={self.eps!r}"
        return f"group_norm(groups={self.groups}{eps})"


def _features(in_shape, kind: str):
    if len(in_shape) not in (1, 2):
        raise SpecError(f"{kind} expects feature vectors or sequences (T, D), got per-sample "
                        f"shape {list(in_shape)}")


def _log_sum_exp(x: Array) -> tuple[Array, Stage]:
    """``lse[n] = log(sum_k exp(x[n, k]))`` (on a sequence ``lse[n, t]``, along the last axis):
    computed shifted by the row's maximum (the stable rewrite of
    :mod:`symbp.derivation.stable`), as softmax cross-entropy's."""
    rows = (index("n"),) if x.rank == 2 else (index("n"), index("t"))
    k = index("k")
    lse = Array("lse", x.dims[:-1])
    return lse, Stage(lse, rows, sp.log(sp.Sum(sp.exp(x[(*rows, k)]), (k, 0, x.dims[-1] - 1))))


class _AlongFeatures(Layer):
    """A function of each row of features through the row's log-sum-exp ``lse`` (computed
    without overflow): the output's stage is :meth:`output` of ``x[n, j]`` and ``lse[n]``."""

    #: what the forward keeps for the backward
    keeps: tuple[str, ...] = ()

    def output(self, element: sp.Expr, lse: sp.Expr) -> sp.Expr:
        raise NotImplementedError

    def output_shape(self, in_shape):
        _features(in_shape, self.kind)
        return in_shape

    def forward_form(self, in_shape):
        _features(in_shape, self.kind)
        dims = (N, F) if len(in_shape) == 1 else sample_dims(in_shape)
        idx = (index("n"), index("j")) if len(in_shape) == 1 else tuple(map(index, "ntd"))
        x = Array("x", dims)
        lse, stage = _log_sum_exp(x)
        y = self.output(x[idx], lse[idx[:-1]])
        return Forward(
            inputs=(x,),
            params=(),
            stages=(stage, Stage(Array("y", dims), idx, y)),
            keep=self.keeps,
            letters=LETTERS,
        )


@register
class Softmax(_AlongFeatures):
    """Softmax along the features: ``y[n, j] = exp(x[n, j]) / sum_k exp(x[n, k])``
    (PyTorch's ``softmax(x, dim=-1)``; on a sequence along each position's features), declared
    as ``exp(x[n, j] - lse[n])`` with the row's
    log-sum-exp ``lse``, which the forward computes without overflow."""

    kind = "softmax"
    keeps = ("y",)  # the backward in terms of the output

    def output(self, element, lse):
        return sp.exp(element - lse)


@register
class LogSoftmax(_AlongFeatures):
    """Log-softmax along the features: ``y[n, j] = x[n, j] - log(sum_k exp(x[n, k]))``
    (PyTorch's ``log_softmax(x, dim=-1)``), the log-sum-exp computed without overflow."""

    kind = "log_softmax"
    keeps = ("lse",)  # the backward reads exp(x - lse), the softmax, kept by the forward

    def output(self, element, lse):
        return element - lse


@register
class GlobalAvgPool(Layer):
    """The mean over each channel's height and width, images ``(C, H, W)`` to features ``(C,)``
    (PyTorch's ``adaptive_avg_pool2d(x, 1).flatten(1)``, ``x.mean(dim=(2, 3))``)."""

    kind = "global_avgpool"

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise SpecError(
                f"global_avgpool expects images (C, H, W), got per-sample shape {list(in_shape)}"
            )
        return in_shape[:1]

    def forward_form(self, in_shape):
        self.output_shape(in_shape)
        n, c, h, w = (index(s) for s in "nchw")
        x = Array("x", (N, C, H, W))
        mean = sp.Sum(x[n, c, h, w], (h, 0, H - 1), (w, 0, W - 1)) / (H * W)
        return Forward(
            inputs=(x,),
            params=(),
            stages=(Stage(Array("y", (N, C)), (n, c), mean),),
            keep=(),
            letters=LETTERS,
        )


@register
class Dropout(Elementwise):
    """Inverted dropout (PyTorch's ``F.dropout``): ``y = x * m / (1 - p)``.

    In training the mask ``m`` is drawn per element from ``rng``, 1 with probability ``1 - p``
    and 0 otherwise, and kept for backward; in evaluation ``m`` is its mean ``1 - p``, so the
    layer is the identity.
    """

    kind = "dropout"
    MASK = sp.Symbol("m", nonnegative=True)
    constants = {"p": sp.Symbol("p", nonnegative=True)}
    training_doc = "``rng`` (a ``np.random.Generator``) draws the dropout masks in training mode."
    evaluation_doc = "dropout is the identity"

    def __init__(self, p: float = 0.5, *, name: str | None = None):
        super().__init__(name=name)
        self.p = _number(p, field="p", minimum=0)
        if not self.p < 1:
            raise SpecError(f"must be below 1 (the probability of dropping), got {p!r}",
                            field="p")

    def expression(self):
        return X * self.MASK / (1 - self.constants["p"])

    def aux_ranges(self):
        return {"m": (sp.Integer(0), sp.Integer(1))}

    def draws(self):
        return {"m": ("binomial", (1, 1 - self.p))}

    def forward_form(self, in_shape):
        dims = sample_dims(in_shape)
        idx = tuple(index(LETTERS[d]) for d in dims)
        x, mask = Array("x", dims), Array("m", dims)
        p = self.constants["p"]
        expr = self.expression().xreplace({X: x[idx], self.MASK: mask[idx]})
        return Forward(
            inputs=(x,),
            params=(),
            aux=(mask,),
            stages=(Stage(Array("y", dims), idx, expr),),
            constants={p: exact(self.p)},
            letters=LETTERS,
            elementwise=True,
        )

    def eval_form(self, in_shape):
        form = self.forward_form(in_shape)
        stage, mask = form.output, form.aux[0]
        expr = stage.expr.xreplace({mask[stage.indices]: 1 - self.constants["p"]})
        return Forward(
            inputs=form.inputs,
            params=(),
            stages=(Stage(stage.array, stage.indices, expr),),
            letters=form.letters,
            elementwise=True,
        )

    def describe(self):
        return f"dropout(p={self.p!r})"
