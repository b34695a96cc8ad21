"""The network's backward pass: each layer's derived VJP, chained in reverse order.

The order of the steps is the network plan's (:mod:`symbp.derivation.plan`).
Backprop is the chain rule evaluated as dynamic programming: the gradient arriving at a layer's
output is computed once and reused for every quantity below it. Each layer type is derived once
(its sizes are symbolic), so deriving a network costs one derivation per distinct layer type plus
one step per layer: linear in depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..declare.decay import WeightDecay
from ..declare.forms import Forward
from ..declare.layers import Layer
from ..declare.net import Net, Placed
from .layer import LayerDerivation, derive_layer
from .unrolled import derive_unrolled

_CACHE: dict[tuple, LayerDerivation] = {}


def derive_cached(layer: Layer, in_shape: tuple[int, ...]) -> LayerDerivation:
    """Derive a layer type once per math key (sizes are symbolic, so widths don't matter)."""
    key = layer.math_key(in_shape)
    if key not in _CACHE:
        cell = layer.unrolled_cell(in_shape)
        form = layer.forward_form(in_shape)
        _CACHE[key] = (derive_layer(form) if cell is None
                       else derive_unrolled(form, cell, in_shape))
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


@dataclass
class DerivedLayer:
    """A placed layer with its derivation (a residual block's is the derivation of ``x + f``)."""

    placed: Placed
    derivation: LayerDerivation
    eval_form: Forward | None

    @property
    def name(self) -> str:
        return self.placed.name

    @property
    def layer(self) -> Layer:
        return self.placed.layer

    @property
    def constants(self) -> dict:
        """This layer's own constants: a derivation is shared by the layers of one math (and
        cached across networks), and its form holds those of the layer derived first."""
        shared = self.derivation.form.constants
        if not shared:
            return {}
        own = self.layer.forward_form(self.placed.in_shape).constants
        return {s: own.get(s, v) for s, v in shared.items()}


@dataclass(frozen=True)
class DecayTerm:
    """The regulariser's term on one parameter (``s = weight_decay/2 * sum W**2``), derived:
    ``derivation.vjp["W"]`` is ``ds/dW``, what the objective ``J = L + s`` adds to ``dL/dW``."""

    key: str  # the parameter, ``fc1.W``
    term: WeightDecay
    derivation: LayerDerivation


@dataclass
class NetworkDerivation:
    net: Net
    layers: list[DerivedLayer]  # depth first, as Net.walk()
    loss: LayerDerivation | None
    #: weight decay's terms, one per covered parameter (none without weight decay)
    decay: list[DecayTerm] = field(default_factory=list)

    def layer(self, name: str) -> DerivedLayer:
        for item in self.layers:
            if item.name == name:
                return item
        raise KeyError(name)


def derive_network(net: Net) -> NetworkDerivation:
    """Derive every layer of ``net`` (and its loss)."""
    layers = [
        DerivedLayer(
            item, derive_cached(item.layer, item.in_shape), item.layer.eval_form(item.in_shape)
        )
        for item in net.walk()
    ]
    loss = derive_cached(net.loss, net.output_shape) if net.loss is not None else None
    shapes = net.param_shapes
    decay = [DecayTerm(key, term, derive_cached(term, shapes[key]))
             for key, term in ((k, WeightDecay(net.weight_decay)) for k in net.decayed)]
    return NetworkDerivation(net, layers, loss, decay)
