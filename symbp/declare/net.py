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
from ..naming import check_identifier, param_key
from .decay import weight_decay_of
from .embedding import check_ids_input
from .layers import MAX_ELEMENTS, REGISTRY, Layer, Loss
from .wiring import network_inputs, place_layers

DTYPES = ("float64", "float32")
#: The network's input when it has one, unnamed (``input = {...}``).
INPUT = "x"
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
    #: the values it reads (a residual block: its input; its body's output is the block's
    #: second), by name: the network's inputs, earlier layers, a split's parts (``s.0``)
    inputs: tuple[str, ...] = (INPUT,)
    #: the layer whose parameters it uses (``share``): itself unless it shares another's
    param_owner: str = ""

    @property
    def in_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-sample shape of each value it reads (``in_shape`` is their tuple for a
        layer reading several)."""
        return tuple(self.in_shape) if self.layer.arity != 1 else (self.in_shape,)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        owner = self.param_owner or self.name
        return {
            param_key(owner, p): s for p, s in self.layer.param_shapes(self.in_shape).items()
        }


class Net:
    """A declared network.

    >>> import symbp
    >>> net = symbp.Net([symbp.linear(3), symbp.relu(), symbp.linear(2)],
    ...                 input_features=4, loss="softmax_cross_entropy")
    >>> list(net.param_shapes)
    ['linear1.W', 'linear1.b', 'linear3.W', 'linear3.b']

    The input is ``input_features=F``, ``input_shape=(C, H, W)``, or integer ids in
    ``[0, input_ids)`` read by an embedding first: one per sample, or a sequence of ``T`` with
    ``input_shape=(T,)`` (TOML: ``input = { ids = V, shape = [T] }``).

    ``weight_decay`` (lambda) trains on ``J = L + s``, ``s = lambda/2 * sum ||W||^2`` over the
    weights of linear and conv layers, or over ``weight_decay_params`` (:mod:`.decay`):

    >>> symbp.Net([symbp.linear(3), symbp.relu(), symbp.linear(2)], input_features=4,
    ...           loss="mse", weight_decay=0.01).decayed
    ('linear1.W', 'linear3.W')
    """

    def __init__(
        self,
        layers: list[Layer],
        *,
        input_features: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        inputs: dict[str, tuple[int, ...]] | None = None,
        loss: str | Loss | None = None,
        name: str = "net",
        dtype: str = "float64",
        input_ids: int | None = None,
        weight_decay: float | None = None,
        weight_decay_params: list[str] | None = None,
    ) -> None:
        self.name = check_identifier(name, what="network name")
        given = [v is not None for v in (input_features, input_shape, inputs)]
        if input_ids is not None:
            if input_features is not None or inputs is not None:
                raise SpecError("give ids or features, not both", field="input")
            given = [True]
        if sum(given) != 1:
            raise SpecError("give exactly one of input features or input shape", field="input")
        if input_features is not None:
            input_shape = (input_features,)
        #: each integer-ids input's number of ids V (ids in [0, V), read by embeddings)
        self.ids: dict[str, int] = {}
        if inputs is not None:
            self.inputs, self.ids = network_inputs(inputs)
        elif input_ids is not None:
            vocabulary, shape = check_ids_input(input_ids, input_shape)
            self.inputs, self.ids = {INPUT: shape}, {INPUT: vocabulary}
        else:
            self.inputs = {INPUT: _checked_shape(input_shape, "input")}
        self.input_shape = next(iter(self.inputs.values()))
        if dtype not in DTYPES:
            raise SpecError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
        self.dtype = dtype
        if not isinstance(layers, list | tuple) or not layers:
            raise SpecError("a network needs at least one layer", field="layers")
        self.loss = _make_loss(loss)
        self.placed = place_layers(self, list(layers))
        self.output_shape = self.placed[-1].out_shape if self.placed else self.input_shape
        if self.loss is not None:
            try:
                self.loss.check_output(self.output_shape)
            except SpecError as err:
                last = f"the output of layer '{self.placed[-1].name}'" if self.placed else "input"
                raise SpecError(f"{err.message} ({last})", field="loss") from None
        #: lambda of the objective J = L + s, s = lambda/2 * sum of ||W||^2 over ``decayed``
        self.weight_decay, self.decayed = weight_decay_of(self, weight_decay, weight_decay_params)

    def sample_input(self, rng, batch: int):
        """A random batch of inputs from ``rng`` (a ``np.random.Generator``): standard normal
        floats, or ids drawn uniformly from ``[0, V)`` where an input is ids; the array of the
        one input ``x``, else a dict by input name."""
        x = {
            name: rng.integers(0, self.ids[name], size=(batch, *shape)) if name in self.ids
            else rng.standard_normal((batch, *shape))
            for name, shape in self.inputs.items()
        }
        return x[INPUT] if list(x) == [INPUT] else x  # one input: its array; several: by name

    @property
    def input_ids(self) -> int | None:
        """The number of ids V where the network's one input ``x`` is integer ids (``input =
        { ids = V }``), else None; named ids inputs: :attr:`ids`."""
        return self.ids.get(INPUT) if list(self.inputs) == [INPUT] else None

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


def _checked_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list):  # an int, an array: not a shape
        raise SpecError(f"must be a tuple of positive integers, got {shape!r}", field=where)
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise SpecError(f"must be positive integers, got {shape!r}", field=where)
    if len(shape) not in (1, 2, 3):
        raise SpecError(
            f"must be features [F], a sequence [T, D] or an image [C, H, W] per sample (the "
            f"batch axis is not part of it), got {list(shape)}",
            field=where,
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise SpecError(
            f"{list(shape)} has {math.prod(shape)} elements per sample, more than "
            "symbp's limit of 2**31",
            field=where,
        )
    return tuple(shape)


def _check_ids(layer: Layer, reads: tuple[str, ...], ids: dict[str, int],
               single: bool) -> None:
    """Integer ids go only into a layer that :attr:`~Layer.takes_ids` (an embedding), read
    directly from a network input of ids; ``single``: the network has one input, ``x``."""
    ids_read = [v for v in reads if v in ids]
    if layer.takes_ids:
        if len(reads) != 1 or not ids_read:
            raise SpecError(f"{layer.kind} reads integer ids: it must be the first layer of a "
                            "network whose input is ids (input = { ids = V }; input_ids=V in "
                            "Python) or read a named ids input (inputs = [name])",
                            field="type")
        layer.bind_ids(ids[reads[0]])
    elif ids_read:
        value = ids_read[0]
        if single:
            raise SpecError(f"the input is integer ids (input = {{ ids = {ids[value]} }}): the "
                            f"first layer must read them (an embedding), not {layer.kind}",
                            field="type")
        raise SpecError(f"the input '{value}' is integer ids (ids = {ids[value]}): only an "
                        f"embedding reads them, not {layer.kind}", field="type")


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
