"""Weight decay: the regulariser ``s`` that the training objective ``J = L + s`` adds to the loss.

As d2l's computational-graph chapter names them: ``L`` the loss, ``s = lambda/2 * (||W1||^2 +
||W2||^2 + ...)`` the regulariser (cs231n's ``0.5 * reg * sum(W**2)``), ``J = L + s`` the
objective. Declared here like a layer's forward pass, one term per parameter it covers,
``s = weight_decay/2 * sum_{i,j} W[i, j]**2``; the gradient ``ds/dW`` is derived by the engine
(:mod:`symbp.derivation.network`), never written down.

Which parameters it covers: by default each layer's declared :attr:`Layer.decayed` (the weights
of linear and conv layers; not biases, normalisation parameters or PReLU slopes), or the keys
and glob patterns given as ``weight_decay_params`` (``["fc1.W", "*.W"]``, matched against the
parameter keys with :func:`fnmatch.fnmatchcase`).
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import sympy as sp

from ..errors import SpecError
from ..naming import param_key
from .base import Layer, _number, exact, shown
from .forms import Array, Forward, Stage, index, size

if TYPE_CHECKING:
    from .net import Net

#: lambda, named as the spec and the generated module name it (``lambda`` is a Python keyword)
WEIGHT_DECAY = sp.Symbol("weight_decay", positive=True)
#: the index letters of a term's parameter, by its rank: W[j], W[i, j], W[c, i, j], W[o, c, i, j]
_LETTERS = "tuvocij"


class WeightDecay(Layer):
    """One term of the regulariser on a parameter of a given rank:
    ``s = weight_decay/2 * sum over every element of W**2``. Not a layer of the network (not
    registered): the objective's term on one parameter, derived as a layer is."""

    kind = "weight_decay"

    def __init__(self, value: float) -> None:
        super().__init__(name=None)
        self.value = value

    def forward_form(self, in_shape: tuple[int, ...]) -> Forward:
        letters = _LETTERS[len(_LETTERS) - len(in_shape):]
        dims = tuple(size(f"D_{letter}") for letter in letters)  # (J is the objective)
        W = Array("W", dims)
        idx = tuple(index(letter) for letter in letters)
        limits = [(i, 0, d - 1) for i, d in zip(idx, dims, strict=True)]
        s = WEIGHT_DECAY / 2 * sp.Sum(W[idx] ** 2, *limits)
        return Forward(
            inputs=(W,),
            params=(),
            stages=(Stage(Array("s", ()), (), s),),
            constants={WEIGHT_DECAY: exact(self.value)},
            keep=(),
            letters=dict(zip(dims, letters, strict=True)),
        )

    def constant_values(self) -> dict[str, float]:
        return {WEIGHT_DECAY.name: self.value}

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))

    def describe(self) -> str:
        return f"weight_decay({self.value!r})"


def weight_decay_of(net: Net, value: Any, params: Any) -> tuple[float, tuple[str, ...]]:
    """``lambda`` and the parameter keys the regulariser covers (none where lambda is 0 or
    absent), checked: a non-negative number, a list of keys or patterns each matching a
    parameter, a network with a loss."""
    if value is None:
        if params is not None:
            raise SpecError("needs weight_decay (lambda) to be set", field="weight_decay_params")
        return 0.0, ()
    value = _number(value, field="weight_decay")
    if value < 0:
        raise SpecError(f"must be a non-negative number (lambda), got {value!r}",
                        field="weight_decay")
    keys = list(net.param_shapes)
    if params is None:
        # a layer sharing another's parameters (share) decays the owner's, once
        covered = list(dict.fromkeys(
            param_key(item.param_owner or item.name, p) for item in net.walk()
            for p in item.layer.decayed if p in item.layer.param_shapes(item.in_shape)))
    else:
        if not isinstance(params, list | tuple) or not all(isinstance(p, str) for p in params):
            raise SpecError(f"must be a list of parameter names or patterns (\"fc1.W\", "
                            f"\"*.W\"), got {shown(params)}", field="weight_decay_params")
        if not params:
            raise SpecError("is empty: leave it out for the default (the weights of linear and "
                            "conv layers), or set weight_decay = 0", field="weight_decay_params")
        for pattern in params:
            if not any(fnmatch.fnmatchcase(key, pattern) for key in keys):
                raise SpecError(f"{pattern!r} names no parameter (parameters: "
                                f"{', '.join(keys) or 'none'})", field="weight_decay_params")
        covered = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in params)]
    if value == 0:
        return 0.0, ()
    if net.loss is None:
        raise SpecError("needs a loss: the objective is J = L + s", field="weight_decay")
    if not covered:
        raise SpecError("covers no parameter: no layer here declares decayed weights (linear and "
                        "conv layers do); name them in weight_decay_params", field="weight_decay")
    return value, tuple(covered)
