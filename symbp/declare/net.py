"""A network: an ordered list of layers, an input shape and a loss, checked at declaration.

``Net`` names unnamed layers (type + position, ``relu3``; inside a residual block
``res1_linear1``), infers every shape, and refuses duplicate names, width mismatches and losses
that do not fit the output -- all as :class:`~symbp.errors.SpecError` naming the layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import SpecError
from ..naming import check_identifier, default_layer_name, param_key
from .layers import MAX_ELEMENTS, REGISTRY, Layer, Loss, Residual

DTYPES = ("float64", "float32")
#: How deeply residual blocks may nest inside each other: the names, the derivation and the
#: TOML reader (which ran out of Python's stack at about 200) all recurse through the nesting.
MAX_NESTING = 16


@dataclass
class Placed:
    """A layer in its place: its name, shapes (per sample) and, for a residual, its body."""

    layer: Layer
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    body: list[Placed] = field(default_factory=list)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            param_key(self.name, p): s for p, s in self.layer.param_shapes(self.in_shape).items()
        }


class Net:
    """A declared network.

    >>> import symbp
    >>> net = symbp.Net([symbp.linear(3), symbp.relu(), symbp.linear(2)],
    ...                 input_features=4, loss="softmax_cross_entropy")
    >>> list(net.param_shapes)
    ['linear1.W', 'linear1.b', 'linear3.W', 'linear3.b']
    """

    def __init__(
        self,
        layers: list[Layer],
        *,
        input_features: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        loss: str | Loss | None = None,
        name: str = "net",
        dtype: str = "float64",
    ) -> None:
        self.name = check_identifier(name, what="network name")
        if (input_features is None) == (input_shape is None):
            raise SpecError("give exactly one of input features or input shape", field="input")
        if input_features is not None:
            input_shape = (input_features,)
        if not isinstance(input_shape, tuple | list):  # an int, an array: not a shape
            raise SpecError(
                f"must be a tuple of positive integers, got {input_shape!r}", field="input"
            )
        if not input_shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
        ):
            raise SpecError(f"must be positive integers, got {input_shape!r}", field="input")
        if len(input_shape) not in (1, 2, 3):
            raise SpecError(
                f"must be features [F], a sequence [T, D] or an image [C, H, W] per sample (the "
                f"batch axis is not part of it), got {list(input_shape)}",
                field="input",
            )
        if math.prod(input_shape) > MAX_ELEMENTS:
            raise SpecError(
                f"{list(input_shape)} has {math.prod(input_shape)} elements per sample, more than "
                "symbp's limit of 2**31",
                field="input",
            )
        self.input_shape = tuple(input_shape)
        if dtype not in DTYPES:
            raise SpecError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
        self.dtype = dtype
        if not isinstance(layers, list | tuple) or not layers:
            raise SpecError("a network needs at least one layer", field="layers")
        self.loss = _make_loss(loss)
        self.placed = self._place(list(layers))
        self.output_shape = self.placed[-1].out_shape if self.placed else self.input_shape
        if self.loss is not None:
            try:
                self.loss.check_output(self.output_shape)
            except SpecError as err:
                last = f"the output of layer '{self.placed[-1].name}'" if self.placed else "input"
                raise SpecError(f"{err.message} ({last})", field="loss") from None

    def _place(self, layers: list[Layer]) -> list[Placed]:
        seen: set[str] = set()

        def place(items, shape, prefix, start, depth=0):
            placed = []
            for position, layer in enumerate(items, start=start):
                if not isinstance(layer, Layer) or isinstance(layer, Loss):
                    raise SpecError(f"{layer!r} is not a layer", field="layers")
                name = layer.name or prefix + default_layer_name(layer.kind, position)
                if name in seen:
                    raise SpecError("duplicate layer name", layer=name, field="name")
                seen.add(name)
                try:
                    if isinstance(layer, Residual):
                        if depth >= MAX_NESTING:
                            raise SpecError(
                                f"residual blocks nest at most {MAX_NESTING} deep", field="layers"
                            )
                        body = place(layer.layers, shape, name + "_", 1, depth + 1)
                        if body[-1].out_shape != shape:
                            raise SpecError(
                                f"residual body maps width {list(shape)} to "
                                f"{list(body[-1].out_shape)}; y = x + F(x) needs them equal",
                                field="layers",
                            )
                        placed.append(Placed(layer, name, shape, shape, body))
                        continue
                    out = layer.output_shape(shape)
                    _check_sizes(layer, shape, out)
                    layer.forward_form(shape)  # declaration errors surface now, not later
                except SpecError as err:
                    raise err.located(layer=name) from None
                placed.append(Placed(layer, name, shape, out))
                shape = out
            return placed

        return place(layers, self.input_shape, "", 1)

    # -- views --------------------------------------------------------------------------------
    def walk(self) -> Iterator[Placed]:
        """Every layer, depth first, residual blocks before their bodies."""

        def visit(items):
            for item in items:
                yield item
                yield from visit(item.body)

        yield from visit(self.placed)

    def find(self, name: str) -> Placed:
        for item in self.walk():
            if item.name == name:
                return item
        raise SpecError(f"no layer named {name!r}", field="layer")

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for item in self.walk():
            shapes.update(item.param_shapes)
        return shapes

    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for item in self.walk():
            for key, shape in item.layer.state_shapes(item.in_shape).items():
                shapes[param_key(item.name, key)] = shape
        return shapes

    def __repr__(self) -> str:
        return f"Net({self.name!r}, {len(self.placed)} layers, loss={self.loss and self.loss.kind})"


def _check_sizes(layer: Layer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    """Refuse a layer whose arrays nobody can allocate: a parameter array of more than
    MAX_ELEMENTS (2**31) elements, or an output or padded input of more per sample, naming the
    field that sets the size (``out``, ``out_channels``, ``padding``)."""
    limit = "more than symbp's limit of 2**31"
    padding = getattr(layer, "padding", 0)
    if padding and len(in_shape) == 3:
        channels, height, width = in_shape
        padded = channels * (height + 2 * padding) * (width + 2 * padding)
        if padded > MAX_ELEMENTS:
            raise SpecError(
                f"the padded input would have {padded} elements per sample, {limit}",
                field="padding",
            )
    field = next((name for name in ("out", "out_channels") if hasattr(layer, name)), None)
    for name, shape in layer.param_shapes(in_shape).items():
        if math.prod(shape) > MAX_ELEMENTS:
            raise SpecError(
                f"its parameter {name} {list(shape)} would have {math.prod(shape)} elements, "
                f"{limit}",
                field=field,
            )
    if math.prod(out_shape) > MAX_ELEMENTS:
        raise SpecError(
            f"its output {list(out_shape)} would have {math.prod(out_shape)} elements per sample, "
            f"{limit}",
            field=field,
        )


def _make_loss(loss) -> Loss | None:
    if loss is None or isinstance(loss, Loss):
        return loss
    if not isinstance(loss, str):
        raise SpecError(f"must be a loss name, got {loss!r}", field="loss")
    cls = REGISTRY.get(loss)
    if cls is None or not issubclass(cls, Loss):
        names = ", ".join(k for k, c in REGISTRY.items() if issubclass(c, Loss))
        raise SpecError(f"unknown loss {loss!r} (known: {names})", field="loss")
    return cls()
