"""Losses: each reduces the network's output ``z`` and the targets to a scalar."""

from __future__ import annotations

from typing import ClassVar

import sympy as sp

from ..errors import SpecError
from .base import LETTERS, REGISTRY, F, Layer, register, sample_dims
from .forms import Array, Forward, N, Stage, index, size


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
    """Mean squared error, mean over all elements (of feature vectors or of sequences)."""

    kind = "mse"

    def check_output(self, out_shape):
        if len(out_shape) not in (1, 2):
            raise SpecError(
                f"mse needs a feature-vector or sequence (T, D) output, got {list(out_shape)}"
            )

    def forward_form(self, in_shape):
        letters = LETTERS
        if len(in_shape) == 2:  # a sequence: the mean over the batch, positions and features
            # (positions indexed by s: t names the targets)
            dims, idx = sample_dims(in_shape), tuple(index(s) for s in "nsd")
            letters = {**LETTERS, dims[1]: "s"}
        else:
            dims, idx = (N, F), (index("n"), index("j"))
        z, t = Array("z", dims), Array("t", dims)
        limits = [(i, 0, d - 1) for i, d in zip(idx, dims, strict=True)]
        loss = sp.Sum((z[idx] - t[idx]) ** 2, *limits) / sp.Mul(*dims)
        return Forward(
            inputs=(z,),
            params=(),
            aux=(t,),
            stages=(Stage(Array("L", ()), (), loss),),
            keep=(),
            letters=letters,
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
