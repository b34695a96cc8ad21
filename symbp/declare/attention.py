"""Scaled dot-product self-attention over sequences, with its Q/K/V and output projections.

One registered class declaring its forward pass as index-notation stages; its backward pass
(dQ, dK, dV, the projections' gradients, softmax's compact backward inside) is derived by
:mod:`symbp.derivation`, nothing here is differentiated by hand.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import LETTERS, SEQ_DIMS, Layer, _integer, register
from .forms import Array, Forward, N, Stage, index, size

T, D = SEQ_DIMS
#: the heads, each head's width, and the key positions (a second name for T's range)
HEADS, E = size("H"), size("E")
KEY = index("u")
ATTENTION_LETTERS = {**LETTERS, HEADS: "h", E: "e"}


@register
class Attention(Layer):
    """Multi-head scaled dot-product self-attention (PyTorch's ``nn.MultiheadAttention`` with
    ``batch_first=True``, query = key = value = the input), on sequences ``(T, D)``.

    Per head ``h`` (``heads`` of them, each ``E = width / heads`` wide)::

        q[n, h, t, e] = sum_d x[n, t, d] Wq[d, h, e] + bq[h, e]      (k and v alike)
        s[n, h, t, u] = sum_e q[n, h, t, e] k[n, h, u, e] / sqrt(E)
        p[n, h, t, u] = softmax over the keys u of s[n, h, t, u]     (u <= t only if causal)
        c[n, h, t, e] = sum_u p[n, h, t, u] v[n, h, u, e]
        y[n, t, o]    = sum_{h, e} c[n, h, t, e] Wo[h, e, o] + bo[o]

    ``width`` defaults to the input's ``D``; the output is ``(T, D)``. The weights are stored
    per head: ``Wq.reshape(D, width)`` is PyTorch's ``in_proj_weight[:width].T`` (``Wk``, ``Wv``
    the next two blocks), ``bq.reshape(width)`` its ``in_proj_bias[:width]``, and
    ``Wo.reshape(width, D)`` is ``out_proj.weight.T``. With ``causal = true`` position ``t``
    attends to positions ``u <= t`` only (``is_causal=True``): the softmax is declared over
    those keys alone, so the derivation is exact, no large negative number stands in.
    """

    kind = "attention"
    init = {"Wq": "fan", "Wk": "fan", "Wv": "fan", "Wo": "fan",
            "bq": "zeros", "bk": "zeros", "bv": "zeros", "bo": "zeros"}

    def __init__(self, heads: int = 1, *, causal: bool = False, width: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.heads = _integer(heads, field="heads")
        if not isinstance(causal, bool):
            raise SpecError(f"must be true or false, got {causal!r}", field="causal")
        self.causal = causal
        self.width = None if width is None else _integer(width, field="width")

    def _width(self, in_shape) -> int:
        width = in_shape[-1] if self.width is None else self.width
        if width % self.heads:
            raise SpecError(f"{self.heads} heads do not divide the width {width}",
                            field="heads")
        return width

    def output_shape(self, in_shape):
        if len(in_shape) != 2:
            raise SpecError(
                f"attention expects sequences (T, D), got per-sample shape {list(in_shape)}"
            )
        self._width(in_shape)
        return in_shape

    def param_shapes(self, in_shape):
        width = self._width(in_shape)
        per_head = (self.heads, width // self.heads)
        model = in_shape[-1]
        shapes = {}
        for w in "qkv":
            shapes[f"W{w}"] = (model, *per_head)
            shapes[f"b{w}"] = per_head
        shapes["Wo"] = (*per_head, model)
        shapes["bo"] = (model,)
        return shapes

    def constant_values(self):
        return {}

    def forward_form(self, in_shape):
        self.output_shape(in_shape)
        n, t, d, h, e, o = (index(s) for s in "ntdheo")
        u = KEY
        x = Array("x", (N, T, D))
        weights = {w: Array(f"W{w}", (D, HEADS, E)) for w in "qkv"}
        biases = {w: Array(f"b{w}", (HEADS, E)) for w in "qkv"}
        Wo, bo = Array("Wo", (HEADS, E, D)), Array("bo", (D,))
        per_head = (N, HEADS, T, E)
        q, k, v = (Array(w, per_head) for w in "qkv")
        scores = Array("s", (N, HEADS, T, T))
        lse = Array("lse", (N, HEADS, T))
        p = Array("p", (N, HEADS, T, T))
        c = Array("c", per_head)

        def projection(w):
            return sp.Sum(x[n, t, d] * weights[w][d, h, e], (d, 0, D - 1)) + biases[w][h, e]

        stages = [Stage(a, (n, h, t, e), projection(a.name)) for a in (q, k, v)]
        stages.append(Stage(scores, (n, h, t, u),
                            sp.Sum(q[n, h, t, e] * k[n, h, u, e], (e, 0, E - 1)) / sp.sqrt(E)))
        logits = scores
        if self.causal:  # the keys after the query's position are out of the softmax: exp(-oo)
            logits = Array("a", (N, HEADS, T, T))
            stages.append(Stage(logits, (n, h, t, u), sp.Piecewise(
                (scores[n, h, t, u], sp.Le(u, t)), (-sp.oo, True))))
        stages += [
            Stage(lse, (n, h, t),
                  sp.log(sp.Sum(sp.exp(logits[n, h, t, u]), (u, 0, T - 1)))),
            Stage(p, (n, h, t, u), sp.exp(logits[n, h, t, u] - lse[n, h, t])),
            Stage(c, (n, h, t, e), sp.Sum(p[n, h, t, u] * v[n, h, u, e], (u, 0, T - 1))),
            Stage(Array("y", (N, T, D)), (n, t, o),
                  sp.Sum(c[n, h, t, e] * Wo[h, e, o], (h, 0, HEADS - 1), (e, 0, E - 1))
                  + bo[o]),
        ]
        params = tuple(a for w in "qkv" for a in (weights[w], biases[w])) + (Wo, bo)
        return Forward(
            inputs=(x,),
            params=params,
            stages=tuple(stages),
            keep=("x", "q", "k", "v", "p", "c"),
            letters=ATTENTION_LETTERS,
            # dc, dp, ds, dv, dk, dq each computed once: substituted into the parameters'
            # gradients they would be recomputed inside every one (sums over T x T x E x D)
            through=("q", "k", "v", "s", "a", "p", "c"),
            # proved at T = 2, D = 1, one head of E = 2 (16 s at batch 2; the defaults,
            # D = 3 and two heads of 3, took over five minutes)
            proof_sizes={T: 2, D: 1, HEADS: 1, E: 2},
        )

    def math_key(self, in_shape):
        return (self.kind, self.causal)

    def describe(self):
        causal = ", causal=True" if self.causal else ""
        width = "" if self.width is None else f", width={self.width}"
        return f"attention(heads={self.heads}{causal}{width})"
