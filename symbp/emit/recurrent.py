"""A recurrent layer's NumPy module: the derived cell, unrolled over time.

The cell (one time step, :mod:`symbp.declare.recurrent`) is derived like any layer and printed
by :class:`~symbp.emit.module.ModuleBuilder`; the template ``recurrent.py.j2`` holds only the
structure of backpropagation through time (the loop over the steps, the state's gradient handed
to the step before, the sum of the weights' gradients over the steps).
"""

from __future__ import annotations

import textwrap

from ..declare.base import Layer
from ..declare.recurrent import GATES, LSTMOutput, LSTMState
from ..derivation.layer import derive_layer
from ..naming import backward_function, forward_function
from ..runtime import registry as runtime
from ..version import __version__
from .layout import MAX_LINE, wrap_line
from .module import ModuleBuilder, environment


def recurrent_module(cell: Layer, in_shape: tuple[int, int]) -> str:
    """The source of a module running ``cell`` over sequences of per-sample shape ``in_shape``
    (T, D): ``forward(x, params, sequence=False)`` and ``backward(dout, caches, params, ...)``."""
    form = cell.forward_form(in_shape)
    derivation = derive_layer(form)
    builder = ModuleBuilder(None, stems={})
    stem = cell.kind
    builder.layer_functions(stem, cell, derivation, None)
    step_input, state = (a.name for a in form.inputs)
    params = [p.name for p in form.params]
    helpers = runtime.closure(builder.helpers)
    return environment().get_template("recurrent.py.j2").render(
        title=cell.describe(),
        version=__version__,
        imports=runtime.imports(helpers),
        helpers=runtime.source(helpers),
        functions=[f.source for f in builder.functions.values()],
        param_shapes={k: tuple(v) for k, v in cell.param_shapes(in_shape).items()},
        hidden=cell.hidden,
        state=state,
        step_input=step_input,
        params=params,
        param_names=", ".join(params),
        read=[p.name for p in derivation.params_read],
        read_names=", ".join(p.name for p in derivation.params_read),
        grad_names=", ".join(f"d{p}" for p in params),
        cell_forward=forward_function(stem),
        cell_backward=backward_function(stem),
    )


def lstm_module(hidden: int, in_shape: tuple[int, int]) -> str:
    """The source of a module running ``nn.LSTM(D, hidden, batch_first=True)`` over sequences
    of per-sample shape ``in_shape`` (T, D): the two derived parts of a step
    (:class:`~symbp.declare.recurrent.LSTMState`, :class:`~symbp.declare.recurrent.LSTMOutput`)
    unrolled over time."""
    state, output = LSTMState(hidden), LSTMOutput(hidden)
    builder = ModuleBuilder(None, stems={})
    context = {}
    grad_names = []
    for role, part in (("state", state), ("output", output)):
        derivation = derive_layer(part.forward_form())
        builder.layer_functions(part.kind, part, derivation, None)
        params = [p.name for p in derivation.form.params]
        grad_names += params
        context[f"{role}_forward"] = forward_function(part.kind)
        context[f"{role}_backward"] = backward_function(part.kind)
        context[f"{role}_params"] = ", ".join(f'p["{name}"]' for name in params)
        context[f"{role}_read"] = ", ".join(f'p["{p.name}"]' for p in derivation.params_read)
        context[f"{role}_grads"] = ", ".join(f"d{name}" for name in params)
    calls = {
        "state_call": "c, state_cache = {state_forward}(x[:, t], h, c, {state_params})",
        "output_call": "h, output_cache = {output_forward}(x[:, t], h, c, {output_params})",
        "output_back": "(dx_o, dh_o, dc_o, {output_grads}) = {output_backward}("
                       "dh, *output_cache, {output_read})",
        "state_back": "(dx_s, dh_s, dc, {state_grads}) = {state_backward}("
                      "dc + dc_o, *state_cache, {state_read})",
    }
    for key, statement in calls.items():
        lines = wrap_line(" " * 8 + statement.format(**context))
        context[key] = "\n".join(part for line in lines for part in wrap_line(line))
    d = in_shape[-1]
    shapes = {"W_ih": (4 * hidden, d), "W_hh": (4 * hidden, hidden),
              "b_ih": (4 * hidden,), "b_hh": (4 * hidden,)}
    helpers = runtime.closure(builder.helpers)
    return environment().get_template("lstm.py.j2").render(
        hidden=hidden,
        version=__version__,
        imports=runtime.imports(helpers),
        helpers=runtime.source(helpers),
        functions=[_fit(f.source) for f in builder.functions.values()],
        param_shapes=shapes,
        gates=GATES,
        grad_names=grad_names,
        **context,
    )


def _fit(source: str) -> str:
    """A generated function's lines within the line length: a long ``return a, b, ...`` in
    parentheses, a long docstring note wrapped (the LSTM's parts return fifteen arrays)."""
    lines = []
    for line in source.split("\n"):
        if len(line) <= MAX_LINE:
            lines.append(line)
        elif line.startswith("    return "):
            body = textwrap.wrap(line[len("    return "):], MAX_LINE - 8)
            lines += ["    return (", *(" " * 8 + part for part in body), "    )"]
        else:
            lines += textwrap.wrap(line, MAX_LINE, initial_indent="    ",
                                   subsequent_indent="    ")
    return "\n".join(lines)
