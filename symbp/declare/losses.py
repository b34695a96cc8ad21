"""Losses: each reduces the network's output ``z`` and the targets to a scalar."""

from __future__ import annotations

from typing import ClassVar

import sympy as sp

from ..errors import SpecError
from .base import LETTERS, REGISTRY, Layer, register, sample_dims
from .forms import Array, Forward, N, Stage, index, size


class Loss(Layer):
    """A loss: reduces the network output ``z`` and targets to a scalar."""

    #: "labels" (integer class per sample) or "targets" (same shape as the output)
    target_kind: ClassVar[str] = "targets"
    #: the closed range targets must lie in, where the loss needs one (probabilities)
    target_range: ClassVar[tuple[float, float] | None] = None

    #: whether the loss also takes image outputs (C, H, W) against targets of that shape
    images: ClassVar[bool] = False

    #: whether the loss also takes sequence outputs (T, D) against targets of that shape
    sequences: ClassVar[bool] = False

    def check_output(self, out_shape: tuple[int, ...]) -> None:
        if (len(out_shape) == 3 and self.images) or (len(out_shape) == 2 and self.sequences):
            return
        if len(out_shape) != 1:
            also = " or sequences (T, D)" if self.sequences else ""
            also += " or images (C, H, W)" if self.images else ""
            raise SpecError(f"{self.kind} needs a feature-vector output{also}, got "
                            f"{list(out_shape)}")


def _mean_over_elements(in_shape, per_element) -> Forward:
    """``L = mean over every element of per_element(z[...], t[...])``: feature vectors
    ``z[n, j]``, sequences ``z[n, s, d]`` (positions indexed ``s``: ``t`` names the targets) or
    images ``z[n, c, h, w]`` (an autoencoder's reconstruction)."""
    dims = sample_dims(in_shape)
    letters = {**LETTERS, dims[1]: "s"} if len(in_shape) == 2 else LETTERS
    z, t = Array("z", dims), Array("t", dims)
    idx = tuple(index(letters[d]) for d in dims)
    limits = [(i, 0, d - 1) for i, d in zip(idx, dims, strict=True)]
    loss = sp.Sum(per_element(z[idx], t[idx]), *limits) / sp.Mul(*dims)
    return Forward(
        inputs=(z,),
        params=(),
        aux=(t,),
        stages=(Stage(Array("L", ()), (), loss),),
        keep=(),
        letters=letters,
    )


@register
class Mse(Loss):
    """Mean squared error, mean over all elements (of feature vectors, sequences or images)."""

    kind = "mse"
    images = True
    sequences = True

    def forward_form(self, in_shape):
        return _mean_over_elements(in_shape, lambda z, t: (z - t) ** 2)


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
    """Binary cross-entropy on logits, mean over all elements (targets in [0, 1]; feature
    vectors or images)."""

    kind = "bce_with_logits"
    target_range = (0.0, 1.0)
    images = True

    def forward_form(self, in_shape):
        # -(t log s(z) + (1 - t) log(1 - s(z))) == log(1 + exp(z)) - t z, exactly.
        return _mean_over_elements(in_shape, lambda z, t: sp.log(1 + sp.exp(z)) - t * z)


LOSSES = tuple(kind for kind, cls in REGISTRY.items() if issubclass(cls, Loss))
