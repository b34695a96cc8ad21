"""A layer declared by its forward pass alone: stages in index notation, parameters, constants.

>>> import symbp
>>> ln = symbp.layer(
...     [
...         "mu[n] = mean(x[n, j], j)",
...         "var[n] = mean((x[n, j] - mu[n])**2, j)",
...         "y[n, j] = gamma[j] * (x[n, j] - mu[n]) / sqrt(var[n] + eps) + beta[j]",
...     ],
...     params={"gamma": "D", "beta": "D"},
...     constants={"eps": 1e-5},
...     init={"gamma": "ones"},
...     name="ln",
... )

In TOML the same is a ``[[layers]]`` table with ``type = "custom"`` and the same fields. The
stages are parsed safely (:mod:`.stages`); the backward pass is derived like a built-in
layer's. See ``docs/custom_layers.md``.
"""

from __future__ import annotations

import builtins
import keyword
import re
from typing import Any

import sympy as sp

from ..errors import SpecError
from .base import Layer, _integer, _number, exact, register
from .expr import CONSTANTS, FUNCTIONS
from .forms import Array, Forward, N, Stage, size
from .stages import REDUCTIONS, Names, build_stage, parse_stage

#: The input's per-sample sizes unless ``input_sizes`` names them: features, images.
DEFAULT_INPUT_SIZES = {1: ("D",), 3: ("C", "H", "W")}
#: At most this many stages (each is derived, and the staged chain rule runs through them all).
MAX_STAGES = 16
#: Names a custom layer's arrays, sizes and constants may not take: those of the generated
#: module and of the functions it calls, and Python's own.
_RESERVED = frozenset(
    {"np", "math", "input_grad", "overwrite", "cache", "params", "grads", "state", "rng",
     "train", "reuse", "x", "N", *FUNCTIONS, *REDUCTIONS, *CONSTANTS, *dir(builtins)}
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
INIT_RULES = ("fan", "zeros", "ones")


def _name(value: Any, *, field: str, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise SpecError(
            f"{what} {value!r} is not a name (ASCII letters, digits and '_', starting with a "
            "letter)",
            field=field,
        )
    if keyword.iskeyword(value) or value in _RESERVED:
        raise SpecError(f"{what} {value!r} is a reserved name", field=field)
    return value


def _table(value: Any, *, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"must be a table of names, got {value!r}", field=field)
    return value


def _shape(value: Any, *, field: str) -> tuple[str, ...]:
    """A parameter's shape as written: ``"D"``, ``"D, K"``, ``["D", "K"]``, ``""`` (a
    scalar)."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")] if value.strip() else []
    elif isinstance(value, list):
        parts = value
    else:
        raise SpecError(
            f"a shape is a string of size names ('D' or 'D, K'), got {value!r}", field=field
        )
    for part in parts:
        if not isinstance(part, str) or not _IDENTIFIER.match(part):
            raise SpecError(f"{part!r} in shape {value!r} is not a size name", field=field)
    return tuple(parts)


@register
class Custom(Layer):
    """A layer declared by its forward pass: named stages in index notation over the input
    ``x[n, ...]``, parameters whose shapes are written in sizes, constants (see the module)."""

    kind = "custom"

    def __init__(
        self,
        stages: list[str],
        *,
        params: dict[str, Any] | None = None,
        constants: dict[str, float] | None = None,
        sizes: dict[str, int] | None = None,
        input_sizes: list[str] | None = None,
        input_arrays: list[str] | None = None,
        init: dict[str, Any] | None = None,
        keep: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if not isinstance(stages, list | tuple) or not stages:
            raise SpecError("must be a non-empty list of stages 'name[n, j] = ...'",
                            field="stages")
        if len(stages) > MAX_STAGES:
            raise SpecError(f"at most {MAX_STAGES} stages, got {len(stages)}", field="stages")
        self.texts = tuple(stages)
        self.parsed = []
        for number, text in enumerate(stages, start=1):
            try:
                self.parsed.append(parse_stage(text))
            except SpecError as err:
                raise SpecError(f"stage {number}: {err.message}", field="stages") from None
        self.params = {
            _name(key, field="params", what="parameter"): _shape(value, field=f"params.{key}")
            for key, value in _table(params, field="params").items()
        }
        self.constants = {
            _name(key, field="constants", what="constant"): _number(
                value, field=f"constants.{key}"
            )
            for key, value in _table(constants, field="constants").items()
        }
        self.sizes = {
            _name(key, field="sizes", what="size"): _integer(value, field=f"sizes.{key}")
            for key, value in _table(sizes, field="sizes").items()
        }
        self.given_arrays = input_arrays is not None
        self._set_arrays(["x"] if input_arrays is None else input_arrays)
        if input_sizes is not None:
            if not isinstance(input_sizes, list | tuple) or not input_sizes:
                raise SpecError(f"must be a list of size names, got {input_sizes!r}",
                                field="input_sizes")
            nested = all(isinstance(item, list | tuple) for item in input_sizes)
            if self.arity > 1 and not (nested and len(input_sizes) == self.arity):
                raise SpecError(f"must be one list of size names per input ({self.arity})",
                                field="input_sizes")
            input_sizes = tuple(
                tuple(_name(i, field="input_sizes", what="size") for i in item)
                for item in (input_sizes if self.arity > 1 else [input_sizes])
            )
        self.input_sizes = input_sizes
        self._check_names()
        self.init = self._init(_table(init, field="init"))
        self.keep = self._keep(keep)

    def _set_arrays(self, names) -> None:
        """The arrays the stages read, one per input (``x``, or ``input_arrays``)."""
        if not isinstance(names, list | tuple) or not names:
            raise SpecError(f"must be a list of array names, got {names!r}",
                            field="input_arrays")
        for item in names:
            if item != "x":
                _name(item, field="input_arrays", what="array")
        if len(set(names)) != len(names):
            raise SpecError(f"names an array twice: {list(names)}", field="input_arrays")
        self.input_arrays = tuple(names)
        self.arity = len(names)

    def reads(self, *inputs: str) -> Layer:
        """As :meth:`Layer.reads`; without ``input_arrays``, the stages read each value by its
        name (``inputs = ["q", "k"]``: ``q[n, j]``, ``k[n, j]``), or ``x`` for one value."""
        super().reads(*inputs)
        if not self.given_arrays and len(self.inputs) > 1:
            if not all(_IDENTIFIER.match(item) for item in self.inputs):
                raise SpecError(
                    f"the stages read the inputs by name, and {list(self.inputs)} are not all "
                    "names: give the arrays' names in input_arrays",
                    field="input_arrays",
                )
            self._set_arrays(list(self.inputs))
            self._check_names()
        return self

    def _keep(self, keep: Any) -> tuple[str, ...] | None:
        """The stages the backward pass reads (None: symbp chooses what it keeps)."""
        if keep is None:
            return None
        stage_names = [stage_name for stage_name, _, _ in self.parsed]
        if not isinstance(keep, list | tuple) or not all(item in stage_names for item in keep):
            raise SpecError(
                f"must be a list of stage names (of {', '.join(stage_names)}), got {keep!r}",
                field="keep",
            )
        return tuple(keep)

    def _check_names(self) -> None:
        """Each name means one thing: a parameter, a constant, a size or a stage."""
        seen: dict[str, str] = {}
        groups = [
            ("parameter", "params", self.params),
            ("constant", "constants", self.constants),
            ("size", "sizes", self.sizes),
            ("size", "input_sizes", [i for item in self.input_sizes or () for i in item]),
            ("input", "input_arrays", [a for a in self.input_arrays if a != "x"]),
        ]
        stage_names = [stage_name for stage_name, _, _ in self.parsed]
        for number, stage_name in enumerate(stage_names, start=1):
            try:
                _name(stage_name, field="stages", what="stage")
            except SpecError as err:
                raise SpecError(f"stage {number}: {err.message}", field="stages") from None
        groups.append(("stage", "stages", stage_names))
        for what, field, names in groups:
            for item in names:
                if item in seen and seen[item] == what:
                    raise SpecError(f"{what} {item!r} is declared twice", field=field)
                if item in seen:
                    raise SpecError(f"{item!r} is both a {seen[item]} and a {what}", field=field)
                seen[item] = what
        for item in seen:
            if item.startswith("d") and item[1:] in {*seen, *self.input_arrays}:
                raise SpecError(
                    f"{item!r} would clash with the gradient of {item[1:]!r} (named d{item[1:]})",
                    field="params" if item in self.params else "stages",
                )
        for key, shape in self.params.items():
            for dim in shape:
                if seen.get(dim, "size") != "size":
                    raise SpecError(f"shape {', '.join(shape)}: {dim!r} is a {seen[dim]}, "
                                    "not a size", field=f"params.{key}")

    def _init(self, table: dict) -> dict[str, Any]:
        """Each parameter's initializer: as given, else ``"fan"`` (Glorot's or He's normal
        draw) for a matrix or more, zeros for a vector or a scalar."""
        rules = {}
        for key, rule in table.items():
            if key not in self.params:
                raise SpecError(f"{key!r} is not a parameter of the layer", field="init")
            if isinstance(rule, str):
                if rule not in INIT_RULES:
                    raise SpecError(f"must be one of {', '.join(INIT_RULES)} or a number, got "
                                    f"{rule!r}", field=f"init.{key}")
                if rule == "fan" and not self.params[key]:
                    raise SpecError("a scalar has no fan-in; give a number", field=f"init.{key}")
            else:
                rule = _number(rule, field=f"init.{key}")
            rules[key] = rule
        return {
            key: rules.get(key, "fan" if len(shape) >= 2 else "zeros")
            for key, shape in self.params.items()
        }

    # -- the declaration, at a rank of input ----------------------------------------------------
    def _shapes(self, in_shape) -> tuple[tuple[int, ...], ...]:
        return tuple(in_shape) if self.arity > 1 else (in_shape,)

    def _input_names(self, in_shape) -> tuple[tuple[str, ...], ...]:
        """Each input's size names: ``input_sizes``, else the default for its rank (inputs
        of one shape share them)."""
        shapes = self._shapes(in_shape)
        if self.input_sizes is None:
            if len(set(shapes)) > 1:
                raise SpecError(
                    f"its inputs have the shapes {', '.join(str(list(s)) for s in shapes)}: "
                    "name each one's sizes (input_sizes = [[...], [...]])",
                    field="input_sizes",
                )
            return (self._one_input_names(shapes[0]),) * len(shapes)
        for names, shape in zip(self.input_sizes, shapes, strict=True):
            if len(names) != len(shape):
                raise SpecError(
                    f"names {len(names)} sizes, but the input has per-sample shape "
                    f"{list(shape)}",
                    field="input_sizes",
                )
        return self.input_sizes

    def _one_input_names(self, in_shape: tuple[int, ...]) -> tuple[str, ...]:
        if len(in_shape) not in DEFAULT_INPUT_SIZES:
            raise SpecError(
                f"the input has per-sample shape {list(in_shape)}: name its sizes",
                field="input_sizes",
            )
        names = DEFAULT_INPUT_SIZES[len(in_shape)]
        taken = {*self.params, *self.constants, *self.sizes,
                 *(stage for stage, _, _ in self.parsed)}
        for item in names:
            if item in taken:
                raise SpecError(
                    f"{item!r} names a size of the input ({', '.join(names)}); name the "
                    "input's sizes otherwise with input_sizes, or rename it",
                    field="input_sizes",
                )
        return names

    def _symbols(self, in_shape) -> tuple[dict[str, sp.Symbol], dict[str, int]]:
        """The size symbols by name (the batch ``N`` included) and each one's value."""
        per_input = self._input_names(in_shape)
        input_names = [item for names in per_input for item in names]
        symbols = {"N": N, **{item: size(item) for item in (*input_names, *self.sizes)}}
        values = dict(self.sizes)
        for names, shape in zip(per_input, self._shapes(in_shape), strict=True):
            for item, length in zip(names, shape, strict=True):
                if values.setdefault(item, length) != length:
                    raise SpecError(f"size {item!r} is {values[item]} for one input and "
                                    f"{length} for another", field="input_sizes")
        return symbols, values

    def _built(self, in_shape) -> tuple[list[Stage], dict[str, Array], dict[str, sp.Symbol]]:
        symbols, _ = self._symbols(in_shape)
        inputs = {
            name: Array(name, (N, *(symbols[item] for item in names)))
            for name, names in zip(self.input_arrays, self._input_names(in_shape), strict=True)
        }
        params = {}
        for key, shape in self.params.items():
            for dim in shape:
                if dim not in symbols or dim == "N":
                    known = ", ".join(item for item in symbols if item != "N")
                    raise SpecError(
                        f"size {dim!r} is not a size of the input or one declared in sizes "
                        f"(known: {known})",
                        field=f"params.{key}",
                    )
            params[key] = Array(key, tuple(symbols[dim] for dim in shape))
        constants = {
            key: sp.Symbol(key, positive=True) if value > 0 else sp.Symbol(key, real=True)
            for key, value in self.constants.items()
        }
        names = Names(
            arrays={**inputs, **params},
            sizes=symbols,
            constants=constants,
            params=set(params),
            shapes={key: ", ".join(shape) for key, shape in self.params.items()},
        )
        stages: list[Stage] = []
        for number, (stage_name, free, rhs) in enumerate(self.parsed, start=1):
            names.later = {later for later, _, _ in self.parsed[number:]}
            try:
                expr, dims = build_stage(names, stage_name, free, rhs)
            except SpecError as err:
                raise SpecError(f"stage {number} ({stage_name}): {err.message}",
                                field="stages") from None
            array = Array(stage_name, dims)
            names.arrays[stage_name] = array
            stages.append(Stage(array, tuple(sp.Symbol(i, integer=True) for i in free), expr))
        self._check_reads(stages, inputs, params)
        return stages, {**inputs, **params}, constants

    def _check_reads(self, stages: list[Stage], inputs, params: dict[str, Array]) -> None:
        """The output runs over the batch first; the input, each parameter and each stage but
        the last are read."""
        output = stages[-1]
        if not output.array.dims or output.array.dims[0] != N or N in output.array.dims[1:]:
            raise SpecError(
                f"the last stage ({output.name}) is the layer's output: its first index, and "
                "only that one, must run over the batch (as n in y[n, j] with x[n, j])",
                field="stages",
            )
        if len(output.array.dims) - 1 not in DEFAULT_INPUT_SIZES:
            raise SpecError(
                f"the last stage ({output.name}) gives {len(output.array.dims) - 1} axes per "
                "sample; a layer's output is features y[n, j] or images y[n, c, h, w]",
                field="stages",
            )
        read = set()
        for stage in stages:
            read |= {
                str(getattr(item, "label", item))
                for item in stage.expr.atoms(sp.IndexedBase, sp.Symbol)
            }
        for name in inputs:
            if name not in read:
                raise SpecError(f"no stage reads the input {name}", field="stages")
        for key in params:
            if key not in read:
                raise SpecError(f"no stage reads the parameter {key!r}", field="params")
        for stage in stages[:-1]:
            if stage.name not in read:
                raise SpecError(
                    f"nothing reads stage {stage.name!r} (the last stage is the output)",
                    field="stages",
                )

    # -- what a layer declares ------------------------------------------------------------------
    def forward_form(self, in_shape):
        stages, arrays, constants = self._built(in_shape)
        # each size is indexed, in the derived formulas, by the first index the user gave it
        letters: dict[sp.Symbol, str] = {N: "n"}
        dims = {name: array.dims for name, array in arrays.items()}
        for stage in stages:
            dims[stage.name] = stage.array.dims
            for item, dim in zip(stage.indices, stage.array.dims, strict=True):
                letters.setdefault(dim, item.name)
            for element in sorted(stage.expr.atoms(sp.Indexed), key=sp.default_sort_key):
                for item, dim in zip(element.indices, dims[str(element.base)], strict=True):
                    letters.setdefault(dim, str(item))
        return Forward(
            inputs=tuple(arrays[name] for name in self.input_arrays),
            params=tuple(arrays[key] for key in self.params),
            stages=tuple(stages),
            constants={symbol: exact(self.constants[key]) for key, symbol in constants.items()},
            keep=self.keep,
            letters=letters,
        )

    def output_shape(self, in_shape):
        stages, _, _ = self._built(in_shape)
        _, values = self._symbols(in_shape)
        return tuple(values[dim.name] for dim in stages[-1].array.dims[1:])

    def param_shapes(self, in_shape):
        _, values = self._symbols(in_shape)
        return {key: tuple(values[dim] for dim in shape) for key, shape in self.params.items()}

    def constant_values(self):
        return dict(self.constants)

    def math_key(self, in_shape):
        return (
            self.kind, len(in_shape), self.texts, tuple(self.params.items()),
            tuple(self.constants), tuple(self.sizes), self.input_sizes, self.keep,
            self.input_arrays,
        )

    @property
    def function_stem(self):
        return self.name or "custom"

    def describe(self):
        return f"custom({', '.join(stage for stage, _, _ in self.parsed)})"

    def title(self, placed_name):
        return placed_name
