"""A recurrent layer's NumPy module: the derived cell, unrolled over time.

The cell (one time step, :mod:`symbp.declare.recurrent`) is derived like any layer and printed
by :class:`~symbp.emit.module.ModuleBuilder`; the template ``recurrent.py.j2`` holds only the
structure of backpropagation through time (the loop over the steps, the state's gradient handed
to the step before, the sum of the weights' gradients over the steps).
"""

from __future__ import annotations

from .. import __version__
from ..declare.base import Layer
from ..derivation.layer import derive_layer
from ..naming import backward_function, forward_function
from ..runtime import registry as runtime
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
