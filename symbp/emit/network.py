"""The network's ``forward`` and ``backward`` bodies, printed from the plan.

:func:`forward_steps` and :func:`backward_steps` turn each step of the
:class:`~symbp.derivation.plan.Plan` into the values ``templates/network.py.j2`` fills in: which
generated function is called on which variables with which parameters, constants and sizes,
where training and evaluation differ (random draws, running state), and where memory may be
reused (``overwrite=True`` on an array nobody else holds). The chain's current value lives in
``h`` (its gradient in ``dh``); a value that more than one step reads is held as
``skip_<reader>`` for the later readers, and their gradients are summed where the plan says.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import sympy as sp

from ..declare.forms import N
from ..derivation.arrays import Lowering
from ..derivation.plan import Plan, Step, Sum, Vjp
from ..naming import backward_function, param_key, predict_function
from .graph_vars import ident, variables
from .numpy_printer import SymbpNumPyPrinter

if TYPE_CHECKING:
    from .module import ModuleBuilder

MESSAGE_WIDTH = 56  # characters of an error message per line of the generated source


def size_values(step_or_placed, form) -> dict[str, int]:
    """The per-sample sizes of a placed layer by name (``{"H_in": 28, ...}``)."""
    item = getattr(step_or_placed, "placed", step_or_placed)
    values = {}
    pairs = list(zip(form.inputs, item.in_shapes, strict=False))
    if not item.body:  # a block's second input is its body's output, of the same shape
        pairs = pairs[:1] if item.layer.arity == 1 else pairs
    for array, shape in (*pairs, (form.output.array, item.out_shape)):
        for dim, length in zip(array.dims[1:], shape, strict=True):
            if isinstance(dim, sp.Symbol):
                values[dim.name] = length
    shapes = item.layer.param_shapes(item.in_shape)  # a size only a parameter has (a table's)
    for array in form.params:
        for dim, length in zip(array.dims, shapes.get(array.name, ()), strict=False):
            if isinstance(dim, sp.Symbol):
                values.setdefault(dim.name, length)
    return values


def _call(function: str, args: list[str]) -> str:
    return f"{function}({', '.join(args)})"


def _keywords(values: dict) -> list[str]:
    return [f"{name}={value!r}" for name, value in values.items()]


def _message_parts(text: str) -> list[str]:
    """An f-string's text cut at spaces into literals of at most :data:`MESSAGE_WIDTH`
    characters; only the parts with a replacement field are f-strings."""
    parts, line = [], ""
    for word in re.findall(r"(?:\{[^}]*\}|[^ {])+", text):  # a replacement field is one word
        if line and len(line) + 1 + len(word) > MESSAGE_WIDTH:
            parts.append(line + " ")
            line = word
        else:
            line = f"{line} {word}" if line else word
    parts.append(line)
    return [("f" if "{" in part else "") + f'"{part}"' for part in parts]


def forward_steps(builder: ModuleBuilder, plan: Plan) -> list[dict]:
    """The forward body's steps, for ``network.forward_step``."""
    rows = []
    names = builder.variables = variables(plan)
    for index, step in enumerate(plan.forward):
        holds = names.holds.get(index, [])
        inputs = names.reads[step.name]
        source = inputs[0]
        owned = builder.h_owned and not holds and source == "h"
        row: dict = dict(name=step.name, holds=holds, reshape=None, modes=False, source=source)
        if step.reshape:
            # The same numbers, one row per sample (C order); the width is spelled out: an empty
            # batch has no -1 to infer.
            shape = " x ".join(str(length) for length in step.placed.in_shape)
            row["reshape"] = dict(width=math.prod(step.placed.in_shape), shape=shape)
            builder.h_owned = False  # a view of its input
            rows.append(row)
            continue
        stem = builder.stems[step.name] + step.stem_suffix
        builder.layer_functions(stem, step.layer, step.derivation, step.eval_form)
        function = builder.forward_names[stem]
        row["views"] = _views(builder, plan, step)
        form = step.derivation.form
        params = [f'params["{key}"]' for key in step.params]
        draws = [
            dict(name=name, method=method, args=", ".join(map(repr, args)))
            for name, (method, args) in step.draws.items()
        ]
        constants = _keywords(step.constants()) + [
            f"{name}={size_values(step, form)[name]}"
            for name in builder.size_keywords.get(function, [])
        ]
        if builder.overwrites.get(function) and owned:
            constants.append("overwrite=True")
        targets = f'h, cache["{step.name}"]'
        returns = step.layer.train_returns
        if returns:
            targets += ", stats"
        row.update(
            targets=targets,
            call=_call(function, [*inputs, *params, *[d["name"] for d in draws], *constants]),
        )
        builder.h_owned = builder.owned_output[stem]
        if step.eval_form is not None:
            builder.uses_rng |= bool(draws)
            row.update(modes=True, draws=draws, too_few=None, state_update=None)
            row["predict"] = _predict_call(step, stem, inputs)
            minimum = step.layer.min_values_per_statistic
            axes = step.layer.statistics_over(step.placed.in_shape)
            others = [a for a in range(len(step.placed.in_shape) + 1) if a not in axes]
            count = " * ".join(f"{source}.shape[{a}]" for a in axes)
            if axes == (0,):
                count = f"len({source})"
            elif len(others) == 1:  # every axis but one: the size over that one's length
                count = f"{source}.size // {source}.shape[{others[0]}]"
            if minimum > 1:
                dims = [form.inputs[0].dims[a] for a in axes]
                label = "*".join(form.letters.get(d, str(d)).upper() for d in dims)
                row["too_few"] = dict(
                    count=count,
                    minimum=minimum,
                    message=_message_parts(
                        f"{step.name}: {step.layer.too_few_values} ({label} = {{{count}}})"
                    ),
                )
            if step.state:
                builder.uses_state = True
                update = builder.state_update_function(stem, step.layer)
                locals_ = [key.rsplit(".", 1)[1] for key in step.state]
                updates = step.layer.state_updates()
                used = {s.name for e in updates.values() for s in e.free_symbols}
                values = step.layer.constant_values()
                row["state_update"] = dict(
                    state=list(zip(locals_, step.state, strict=True)),
                    targets=", ".join(f"{local}[...]" for local in locals_),
                    call=_call(
                        update,
                        [*locals_, "*stats", count]
                        + [f"{k}={v!r}" for k, v in values.items() if k in used],
                    ),
                )
        rows.append(row)
    return rows


def _views(builder: ModuleBuilder, plan: Plan, step: Step) -> list[dict]:
    """After ``step``: the cache entries of earlier steps that read their kept array from the
    copy ``step`` keeps (a ReLU's output from the next convolution's zero-padded input), so
    that the array is kept once."""
    rows = []
    for view in plan.views:
        if view.source != step.name:
            continue
        holder = plan.step(view.holder)
        read_in = holder if view.reshaped else step  # whose notation the element is in
        form = read_in.derivation.form
        lowering = Lowering(set(form.arrays) | {view.source_array}, form)
        numbers = {sp.Symbol(k, integer=True, positive=True): v
                   for k, v in size_values(read_in, form).items()}
        numbers[N] = sp.Symbol("len(h)")  # the batch: h holds the step's output
        values = read_in.layer.constant_values()  # this layer's (a shared derivation's are
        numbers.update({s: sp.Integer(values.get(s.name, v))  # another's of the same math)
                        for s, v in form.constants.items()})
        value = lowering.lower(view.element, view.indices)
        position = step.kept.index(view.source_array)
        source = sp.Symbol(f'cache["{step.name}"][{position}]')
        value = value.xreplace(numbers).xreplace({lowering.symbol(view.source_array): source})
        printer = SymbpNumPyPrinter()
        printed = printer.doprint(value)
        builder.helpers |= printer.helpers_used
        entries = [
            printed if name == view.array else f'cache["{holder.name}"][{i}]'
            for i, name in enumerate(holder.kept)
        ]
        rows.append(dict(
            target=f'cache["{holder.name}"]',
            value=f"({', '.join(entries)}{',' if len(entries) == 1 else ''})",
            note=f"{holder.name}'s {view.array}: "
            + (f"{step.name}'s {view.source_array}, reshaped back" if view.reshaped
               else f"the interior of {step.name}'s {view.source_array}"),
        ))
    return rows


def _predict_call(step: Step, stem: str, inputs: list[str]) -> str:
    eval_form = step.eval_form
    owner = step.placed.param_owner or step.name
    params = [f'params["{param_key(owner, p.name)}"]' for p in eval_form.params]
    keys = [param_key(step.name, a.name) for a in eval_form.aux]
    state = [f'state["{key}"]' for key in keys if key in step.state]
    return _call(predict_function(stem),
                 [*inputs, *params, *state, *_keywords(step.eval_constants())])


def backward_steps(builder: ModuleBuilder, plan: Plan) -> list[dict]:
    """The backward body's steps, for ``network.backward_step``."""
    rows = []
    names = getattr(builder, "variables", None) or variables(plan)
    written: set[str] = set()  # shared parameters' gradients written so far
    for index, entry in enumerate(plan.backward):
        if isinstance(entry, Sum):
            target = names.targets[index][0]
            line = f"{target} = " + " + ".join(names.parts[index])
            # no parameter before the value: its gradient is for wrt_input only
            rows.append(dict(guard=entry.value in plan.free, line=line))
            builder.dh_owned = target == "dh"
            continue
        rows.extend(_vjp_rows(builder, plan, entry, index, names, written))
    return rows


def _vjp_rows(builder: ModuleBuilder, plan: Plan, entry: Vjp, index: int, names,
              written: set[str]) -> list[dict]:
    step = entry.step
    optional = step.input_grad_optional
    upstream = names.upstream[index]
    gradients = names.targets[index]
    if step.reshape:
        shape = ", ".join(str(length) for length in step.placed.in_shape)
        line = f"{gradients[0]} = {upstream}.reshape(len({upstream}), {shape})  # {step.name}"
        return [dict(guard=optional, line=line)]
    stem = builder.stems[step.name] + step.stem_suffix
    function = backward_function(stem)
    form = step.derivation.form
    keep = [f'*cache["{step.name}"]'] if step.kept else []
    params_read = [f'params["{key}"]' for key in step.params_read]
    constants = _keywords(step.backward_constants()) + [
        f"{name}={size_values(step, form)[name]}"
        for name in builder.size_keywords.get(function, [])
    ]
    args = [upstream, *keep, *params_read, *constants]
    # a shared parameter's gradient is the sum over its uses: the first written goes into
    # grads, each later one is added to it
    later = {key: f"d{key.rsplit('.', 1)[1]}_{ident(step.name)}" for key in step.grads
             if key in written}
    targets = [*gradients, *(later.get(key, f'grads["{key}"]') for key in step.grads)]
    if step.params and optional and step.grad_inputs:
        args.append("input_grad=wrt_input")
    if builder.dh_owned and upstream == "dh" and builder.overwrites.get(function):
        args.append("overwrite=True")
    owner = step.placed.param_owner or step.name
    for param in builder.outs.get(function, []):
        if param_key(owner, param) not in later:
            args.append(f'd{param}_out=reuse.get("{owner}.{param}")')
    builder.dh_owned = builder.owned_grad[stem] and len(step.inputs) == 1
    line = f"{', '.join(targets)} = {_call(function, args)}"
    rows = [dict(guard=optional and not step.params, line=line)]
    for key, variable in later.items():
        rows.append(dict(guard=False, line=f'grads["{key}"] = grads["{key}"] + {variable}'))
    written.update(step.grads)
    return rows


def inits(plan: Plan) -> list[dict]:
    """Each parameter's initializer: He's gain before a ReLU-like activation, else Glorot's."""
    result = []
    for step in plan.forward:
        if step.placed.param_owner:  # another layer's parameters: initialized there
            continue
        for param, shape in step.layer.param_shapes(step.placed.in_shape).items():
            key = param_key(step.name, param)
            rule = step.layer.init.get(param, "zeros")
            if rule == "normal":  # N(0, 1), as nn.Embedding's table
                result.append(dict(key=key, kind="normal", std="1.0", shape=tuple(shape)))
                continue
            if rule != "fan":
                value = {"zeros": 0.0, "ones": 1.0}.get(rule, rule)
                result.append(dict(key=key, kind="full", value=repr(float(value)), shape=shape))
                continue
            if len(shape) == 4:  # a kernel (out, in, kh, kw), as PyTorch counts
                field = shape[2] * shape[3]
                fan_in, fan_out = shape[1] * field, shape[0] * field
            else:
                fan_in, fan_out = shape[0], shape[-1]
            he = _next_activation(plan, step)
            std = math.sqrt(2 / fan_in) if he else math.sqrt(2 / (fan_in + fan_out))
            result.append(dict(key=key, kind="normal", std=repr(std), shape=tuple(shape)))
    return result


def _next_activation(plan: Plan, step: Step) -> bool:
    """Whether the one step reading ``step``'s output (through layers an initializer looks
    through, batch norm) declares He's gain."""
    while True:
        readers = plan.readers.get(step.output, [])
        if len(readers) != 1:
            return False
        step = plan.step(readers[0])
        if not step.layer.init_looks_through:
            return step.layer.he_gain_before

