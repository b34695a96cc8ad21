"""Load a network from a TOML spec file (stdlib ``tomllib``).

```toml
name = "mlp_bn"
input = { features = 784 }
loss = "softmax_cross_entropy"

[[layers]]
type = "linear"
name = "fc1"
out = 256
```

Every problem comes out as one :class:`~symbp.errors.SpecError` naming the file, the layer and
the field. A layer table's keys are ``type``, ``name`` and the layer constructor's arguments.
"""

from __future__ import annotations

import inspect
import os
import tomllib
from pathlib import Path
from typing import Any

from ..errors import Position, SpecError
from ..naming import default_layer_name
from .layers import REGISTRY, Layer, Loss, Residual, shown
from .net import MAX_NESTING, Net

TOP_LEVEL = {"name", "input", "inputs", "loss", "layers", "dtype", "weight_decay",
             "weight_decay_params"}
#: Fields every layer table may have besides its type's: the graph's (``docs/graphs.md``).
GRAPH_FIELDS = ("inputs", "share")
#: The largest spec file symbp reads (the examples are under 2 KiB).
MAX_SPEC_BYTES = 2**20


def load_spec(path: str | Path) -> Net:
    """Read and check a spec file."""
    if not isinstance(path, str | os.PathLike):
        raise SpecError(f"a spec is the path of a TOML file, got {type(path).__name__}")
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_SPEC_BYTES + 1)  # bounded: /dev/zero never ends
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(
                f"is larger than {MAX_SPEC_BYTES // 2**20} MiB, symbp's limit on a spec file",
                file=str(path),
            )
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except FileNotFoundError:
        raise SpecError("no such file", file=str(path)) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a spec file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read: {err}", file=str(path)) from None
    try:
        return parse_spec(text)
    except SpecError as err:
        raise err.located(file=str(path)) from None


def parse_spec(text: str) -> Net:
    """Build a :class:`Net` from TOML text."""
    if not isinstance(text, str):
        raise SpecError(f"a spec is TOML text, got {type(text).__name__}")
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"invalid TOML: {err}") from None
    except ValueError as err:  # Python refuses an integer of more than 4300 digits
        raise SpecError(f"invalid TOML: {_short_reason(err)}") from None
    except RecursionError:  # the reader recurses through nested arrays and inline tables
        raise SpecError(
            "arrays or tables nest too deeply for the TOML reader (residual blocks nest at most "
            f"{MAX_NESTING} deep)"
        ) from None
    unknown = set(data) - TOP_LEVEL
    if unknown:
        raise SpecError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(TOP_LEVEL))})"
        )
    name = data.get("name", "net")
    loss = data.get("loss")
    if loss is not None and not isinstance(loss, str):
        raise SpecError(f"must be a string, got {loss!r}", field="loss")
    inputs = None
    if "inputs" in data:
        if "input" in data:
            raise SpecError("give either input (one) or inputs (named), not both",
                            field="inputs")
        inputs = _named_inputs(data["inputs"])
        input_features = input_shape = input_ids = None
    else:
        input_features, input_shape, input_ids = _input(data.get("input"))
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SpecError("a spec needs a non-empty [[layers]] list", field="layers")
    built = [_layer(table, position) for position, table in enumerate(layers, start=1)]
    return Net(
        built,
        input_features=input_features,
        input_shape=input_shape,
        inputs=inputs,
        input_ids=input_ids,
        loss=loss,
        name=name,
        dtype=data.get("dtype", "float64"),
        weight_decay=data.get("weight_decay"),
        weight_decay_params=data.get("weight_decay_params"),
    )


def _input(value: Any) -> tuple[int | None, tuple[int, ...] | None, int | None]:
    """``input``'s features, per-sample shape and number of ids (``{ ids = V, shape = [T] }``);
    the ones not given are None."""
    if not isinstance(value, dict):
        raise SpecError(
            "must be a table: input = { features = 784 }, input = { shape = [C, H, W] } or "
            "input = { ids = V }",
            field="input",
        )
    _check_64_bits(value, field="input")
    if "ids" in value:
        if set(value) - {"ids", "shape"}:
            raise SpecError("with ids, the only other key is shape = [T]", field="input")
        return None, value.get("shape"), value["ids"]
    if set(value) - {"features", "shape"} or len(value) != 1:
        raise SpecError("takes exactly one of 'features', 'shape' or 'ids'", field="input")
    if "features" in value:
        features = value["features"]
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise SpecError(f"must be a positive integer, got {features!r}", field="input")
        return features, None, None
    shape = value["shape"]
    if not isinstance(shape, list) or not shape:
        raise SpecError(f"must be a list of positive integers, got {shape!r}", field="input")
    return None, tuple(shape), None


def _named_inputs(value: Any) -> dict[str, tuple[int, ...] | dict]:
    """``[inputs]`` with one entry per input: ``x = [4]`` (its per-sample shape), or
    ``x = { features = 4 }`` / ``{ shape = [C, H, W] }`` / ``{ ids = V, shape = [T] }`` as
    ``input`` takes (ids: ``{"ids": V, "shape": [T] or None}``)."""
    if not isinstance(value, dict) or not value:
        raise SpecError(
            "must be a table of named inputs: [inputs] x = [4], mask = [4]", field="inputs"
        )
    _check_64_bits(value, field="inputs")
    shapes = {}
    for name, shape in value.items():
        if isinstance(shape, dict):
            try:
                features, shape, ids = _input(shape)
            except SpecError as err:
                raise SpecError(err.message, field=f"inputs.{name}") from None
            if ids is not None:
                shapes[name] = {"ids": ids, "shape": shape}
                continue
            shape = (features,) if features is not None else shape
        if not isinstance(shape, list | tuple):
            raise SpecError(f"must be a shape such as [4], got {shown(shape)}",
                            field=f"inputs.{name}")
        shapes[name] = tuple(shape)
    return shapes


def _layer(table: Any, position: int, parent: str = "") -> Layer:
    """The layer a ``[[layers]]`` table declares; ``parent``: the residual block it is in.

    Errors name the layer as the network will (its name, or its type and position, as
    ``relu3`` or ``res1_linear1``), or by its place, counted from 1 (``layer 3 of [[layers]]``,
    ``layer 1 of the block 'res1'``), where it has no type or name."""
    if not parent:
        where = Position(f"{position} of [[layers]]")
    else:
        block = parent if isinstance(parent, Position) else f"'{parent}'"
        where = Position(f"{position} of the block {block}")
    if not isinstance(table, dict):
        raise SpecError(f"must be a table (one layer), got {shown(table)}", layer=where)
    name = table.get("name")
    kind = table.get("type")
    if isinstance(name, str) and name:
        label = name
    elif (
        name is None
        and isinstance(kind, str)
        and kind in REGISTRY
        and not isinstance(parent, Position)
    ):
        label = (f"{parent}_" if parent else "") + default_layer_name(kind, position)
    else:
        label = where
    if kind is None:
        raise SpecError("missing field", layer=label, field="type")
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None or issubclass(cls, Loss):
        known = ", ".join(sorted(k for k, c in REGISTRY.items() if not issubclass(c, Loss)))
        raise SpecError(f"unknown layer type {kind!r} (known: {known})", layer=label, field="type")
    arguments = {k: v for k, v in table.items() if k not in ("type", *GRAPH_FIELDS)}
    graph = {k: table[k] for k in GRAPH_FIELDS if k in table}
    for key, value in arguments.items():
        if not (cls is Residual and key == "layers"):  # the body's layers are checked in theirs
            _check_64_bits(value, layer=label, field=key)
    allowed = _fields(cls) | set(GRAPH_FIELDS)
    for key in arguments:
        if key not in allowed:
            raise SpecError(
                f"unknown field for {kind} (allowed: {', '.join(sorted(allowed))})",
                layer=label,
                field=key,
            )
    for key, param in inspect.signature(cls.__init__).parameters.items():
        if key != "self" and param.default is inspect.Parameter.empty and key not in arguments:
            raise SpecError(f"missing field for {kind}", layer=label, field=key)
    if cls is Residual:
        body = arguments.get("layers")
        if not isinstance(body, list) or not body:
            raise SpecError("must be a non-empty list of layers", layer=label, field="layers")
        arguments["layers"] = [_layer(item, i, label) for i, item in enumerate(body, start=1)]
    try:
        layer = cls(**arguments)
        if "inputs" in graph:
            reads = graph["inputs"]
            if isinstance(reads, str):
                reads = [reads]
            if not isinstance(reads, list):
                raise SpecError(f"must be a list of value names, got {shown(reads)}",
                                field="inputs")
            layer.reads(*reads)
        if "share" in graph:
            layer.sharing(graph["share"])
        return layer
    except SpecError as err:
        raise err.located(layer=label) from None


def _check_64_bits(value: Any, *, layer: str | None = None, field: str) -> None:
    """Refuse an integer TOML does not allow: TOML's integers are 64-bit, Python's reader
    takes any (``out = 10**30`` reached the layer as a Python int)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, int) and not -(2**63) <= item < 2**63:
            raise SpecError(
                "an integer outside TOML's 64-bit range (-2**63 to 2**63 - 1), "
                f"of {item.bit_length()} bits",
                layer=layer,
                field=field,
            )


def _short_reason(err: ValueError) -> str:
    if "integer string conversion" in str(err):
        return "an integer of more than 4300 digits; TOML integers are 64-bit"
    return str(err)


def _fields(cls: type[Layer]) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k != "self"}
