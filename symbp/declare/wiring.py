"""A network's graph: which values each layer reads, and whose parameters it uses.

:func:`place_layers` names every layer, resolves what it reads (``inputs``, else the previous
layer's output), infers every shape in order and checks the graph: a layer reads only the
network's inputs and earlier layers (so there is no cycle), each value it names exists, the
number and the shapes of its inputs fit it, every value is read, and a layer sharing another's
parameters (``share``) has one of the same type and parameter shapes. Every problem is one
:class:`~symbp.errors.SpecError` naming the layer and the field. See ``docs/graphs.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SpecError
from ..naming import RESERVED, check_identifier, default_layer_name
from .layers import Layer, Loss, Residual

if TYPE_CHECKING:
    from .net import Net, Placed

#: Names a network input may not take besides the reserved ones: the generated module's own
#: variables (``x``, the single input's name, is allowed).
_INPUT_RESERVED = (RESERVED - {"x"}) | {
    "h", "dh", "out", "reuse", "wrt_input", "loss_cache", "dtype", "stats"}
#: ... nor a name of the form of its other variables and functions
_INPUT_PREFIXES = ("_", "skip_", "dskip_", "d_")
_INPUT_SUFFIXES = ("_forward", "_backward", "_predict", "_running_stats")
#: The most named inputs a network may have.
MAX_INPUTS = 64


def network_inputs(inputs) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """The network's named inputs, ``{name: per-sample shape}``, checked, and those of integer
    ids, ``{name: V}`` (an input ``{"ids": V, "shape": (T,)}``, shape optional)."""
    from .embedding import check_ids_input
    from .net import _checked_shape

    if not isinstance(inputs, dict) or not inputs:
        raise SpecError(f"must be a table of named inputs, got {inputs!r}", field="inputs")
    if len(inputs) > MAX_INPUTS:
        raise SpecError(f"at most {MAX_INPUTS} inputs, got {len(inputs)}", field="inputs")
    result, ids = {}, {}
    for name, shape in inputs.items():
        if not isinstance(name, str) or (name in _INPUT_RESERVED and name != "x") or (
                name.startswith(_INPUT_PREFIXES) or name.endswith(_INPUT_SUFFIXES)):
            raise SpecError(f"input name {name!r} is reserved (a name the generated module "
                            "uses)", field="inputs")
        try:
            if name != "x":
                check_identifier(name, what="input name")
        except SpecError as err:
            raise SpecError(err.message, field="inputs") from None
        if isinstance(shape, dict):
            if "ids" not in shape or set(shape) - {"ids", "shape"}:
                raise SpecError("must be a shape, or integer ids { ids = V } (shape = [T] "
                                "optional)", field=f"inputs.{name}")
            try:
                ids[name], result[name] = check_ids_input(shape["ids"], shape.get("shape"))
            except SpecError as err:
                raise SpecError(err.message, field=f"inputs.{name}") from None
            continue
        result[name] = _checked_shape(shape, f"inputs.{name}")
    return result, ids


def _declared_names(layers, prefix="") -> dict[str, int]:
    """Every layer name the network will have, with its order of placement (blocks as deep
    as they may nest: placing them refuses deeper ones)."""
    from .net import MAX_NESTING

    names: dict[str, int] = {}

    def visit(items, prefix, depth):
        for position, layer in enumerate(items, start=1):
            if not isinstance(layer, Layer):
                continue
            name = layer.name or prefix + default_layer_name(layer.kind, position)
            names.setdefault(name, len(names))
            if isinstance(layer, Residual) and depth < MAX_NESTING:
                visit(layer.layers, name + "_", depth + 1)

    visit(layers, prefix, 0)
    return names


def place_layers(net: Net, layers: list[Layer]) -> list[Placed]:
    """Every layer in its place (see the module docstring)."""
    from .net import INPUT, MAX_NESTING, Placed, _check_ids, _check_sizes

    values: dict[str, tuple[int, ...]] = dict(net.inputs)  # value -> per-sample shape
    declared = _declared_names(layers)
    seen: set[str] = set()

    def place(items, previous, prefix, start, depth=0):
        placed = []
        for position, layer in enumerate(items, start=start):
            if not isinstance(layer, Layer) or isinstance(layer, Loss):
                raise SpecError(f"{layer!r} is not a layer", field="layers")
            name = layer.name or prefix + default_layer_name(layer.kind, position)
            if name in seen:
                raise SpecError("duplicate layer name", layer=name, field="name")
            if name in net.inputs:
                raise SpecError(f"'{name}' is the name of a network input", layer=name,
                                field="name")
            seen.add(name)
            try:
                reads = _reads(layer, name, previous, values, declared)
                _check_ids(layer, reads, net.ids, single=list(net.inputs) == [INPUT])
                shapes = tuple(values[v] for v in reads)
                shape = shapes[0] if layer.arity == 1 else shapes
                if layer.arity != 1:
                    layer.check_inputs(shapes)
                if isinstance(layer, Residual):
                    if depth >= MAX_NESTING:
                        raise SpecError(
                            f"residual blocks nest at most {MAX_NESTING} deep", field="layers"
                        )
                    body = place(layer.layers, reads[0], name + "_", 1, depth + 1)
                    if body[-1].out_shape != shape:
                        raise SpecError(
                            f"residual body maps width {list(shape)} to "
                            f"{list(body[-1].out_shape)}; y = x + F(x) needs them equal",
                            field="layers",
                        )
                    placed.append(Placed(layer, name, shape, shape, body, reads))
                    values[name], previous = shape, name
                    continue
                parts = layer.parts(shape)
                for k, part in enumerate(parts):
                    out = part.output_shape(shape)
                    placed.append(Placed(part, f"{name}.{k}", shape, out, inputs=reads))
                    values[f"{name}.{k}"] = out
                if parts:
                    previous = None  # what follows a split names the part it reads
                    continue
                out = layer.output_shape(shape)
                _check_sizes(layer, shape, out)
                layer.forward_form(shape)  # declaration errors surface now, not later
            except SpecError as err:
                raise err.located(layer=name) from None
            placed.append(Placed(layer, name, shape, out, inputs=reads))
            values[name], previous = out, name
        return placed

    placed = place(layers, next(iter(net.inputs)), "", 1)  # the first reads the first input
    if placed and "." in placed[-1].name:
        raise SpecError("a network's output is one value: read the split's parts",
                        layer=placed[-1].name.rsplit(".", 1)[0], field="sizes")
    _check_read(net, placed)
    _share(placed)
    for item in _walk(placed):  # the generated forward's local names (rrelu's r, dropout's m)
        local = {*item.layer.draws(), *item.layer.state_shapes(item.in_shape)}
        for name in local & set(net.inputs):
            raise SpecError(f"input name {name!r} is a name layer '{item.name}' uses in the "
                            "generated module", field="inputs")
    return placed


def _reads(layer: Layer, name: str, previous, values, declared) -> tuple[str, ...]:
    """The values ``layer`` reads, each one known and computed before it."""
    if layer.inputs is None:
        if previous is None:
            raise SpecError(
                "reads the previous layer's output, but there is none to read: name the "
                "values it reads (inputs = [...]: network inputs, earlier layers, a split's "
                "parts name.0, name.1)",
                field="inputs",
            )
        reads = (previous,)
    else:
        reads = layer.inputs
    for value in reads:
        if value in values:
            continue
        parts = sorted(v for v in values if v.startswith(f"{value}."))
        if parts:
            raise SpecError(f"reads the split '{value}': name one of its parts, "
                            f"{', '.join(parts)}", field="inputs")
        if value == name:
            raise SpecError(f"reads its own output '{value}': a network has no cycles",
                            field="inputs")
        if value in declared:
            raise SpecError(
                f"reads '{value}', which comes after it: a layer reads the network's inputs "
                "and earlier layers only (no cycles)",
                field="inputs",
            )
        raise SpecError(f"unknown input '{value}' (known: {', '.join(values)})", field="inputs")
    count = len(reads)
    if layer.arity is None and count < 2:
        raise SpecError(f"{layer.kind} reads two or more values, got {count}", field="inputs")
    if layer.arity is not None and count != layer.arity:
        wanted = "one value" if layer.arity == 1 else f"{layer.arity} values"
        raise SpecError(f"{layer.kind} reads {wanted}, got {count} ({', '.join(reads)})",
                        field="inputs")
    return tuple(reads)


def _walk(placed):
    for item in placed:
        yield item
        yield from _walk(item.body)


def _check_read(net: Net, placed) -> None:
    """Every value but the output is read by some layer (a dangling one has no gradient)."""
    read = {v for item in _walk(placed) for v in item.inputs}
    read |= {item.body[-1].name for item in _walk(placed) if item.body}
    for name in net.inputs:
        if name not in read:
            raise SpecError(f"the network input '{name}' is read by no layer", field="inputs")
    output = placed[-1].name
    for item in _walk(placed):
        if item.name not in read and item.name != output:
            raise SpecError(
                "its output is read by no layer (the network's output is the last layer's)",
                layer=item.name, field="inputs" if "." not in item.name else "sizes",
            )


def _share(placed) -> None:
    """Resolve ``share``: the layer's parameters are its owner's (same type and shapes)."""
    by_name = {item.name: item for item in _walk(placed)}
    for item in _walk(placed):
        owner_name = item.layer.share
        if owner_name is None:
            continue
        try:
            owner = by_name.get(owner_name)
            if owner is None or owner is item:
                what = "itself" if owner is item else f"no layer named '{owner_name}'"
                raise SpecError(f"shares the parameters of {what}", field="share")
            if owner.layer.share is not None:
                raise SpecError(
                    f"'{owner_name}' itself shares '{owner.layer.share}'s parameters: share "
                    f"'{owner.layer.share}'",
                    field="share",
                )
            if type(owner.layer) is not type(item.layer):
                raise SpecError(
                    f"'{owner_name}' is a {owner.layer.kind}, this layer a {item.layer.kind}: "
                    "only a layer of the same type can share its parameters",
                    field="share",
                )
            mine = item.layer.param_shapes(item.in_shape)
            theirs = owner.layer.param_shapes(owner.in_shape)
            if not mine:
                raise SpecError(f"{item.layer.kind} has no parameters to share", field="share")
            if mine != theirs:
                raise SpecError(
                    f"'{owner_name}' has parameters {_shapes(theirs)}, this layer needs "
                    f"{_shapes(mine)}",
                    field="share",
                )
        except SpecError as err:
            raise err.located(layer=item.name) from None
        item.param_owner = owner_name


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
