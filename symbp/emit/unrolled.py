"""The layer functions of a layer unrolled over time (rnn, :mod:`symbp.derivation.unrolled`).

The cell's forward and backward are printed by the builder like any layer's (their stem with
``_cell``); ``templates/unrolled.py.j2`` holds the loop over the steps around them, so the
network calls ``<stem>_forward(x, *params)`` and ``<stem>_backward(dy, *kept, *params_read)``
as it calls any layer's.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ..derivation.derivation import LayerDerivation
from ..naming import adjoint, backward_function, forward_function
from .layout import MAX_LINE

if TYPE_CHECKING:
    from ..declare.base import Layer
    from .module import ModuleBuilder


def unrolled_functions(builder: ModuleBuilder, stem: str, layer: Layer,
                       derivation: LayerDerivation) -> None:
    """Print the cell's functions and the layer's loops around them into ``builder``."""
    from .module import _Function  # the builder's record of a printed function

    cell = derivation.cell
    cell_stem = f"{stem}_cell"
    builder.layer_functions(cell_stem, derivation.cell_layer, cell, None)
    form, cell_form = derivation.form, cell.form
    step_input, state = (a.name for a in cell_form.inputs)
    hidden = state_array = cell_form.inputs[1]
    width = next(f"{p.name}.shape[{axis}]" for p in cell_form.params
                 for axis, dim in enumerate(p.dims) if dim == hidden.dims[1])
    kept = [a.name for a in derivation.cached]
    read = [p.name for p in derivation.params_read]
    params = [p.name for p in cell_form.params]
    grads = [adjoint(p) for p in params]
    sequence = len(form.output.array.dims) == 3
    cell_forward, cell_backward = builder.forward_names[cell_stem], backward_function(cell_stem)
    returned = "the states (N, T, H)" if sequence else "the last state"
    forward_doc = (f"Forward pass of {layer.kind}: {cell_forward} at t = 0..T-1 (the state 0 "
                   f"before the first step), the weights shared by the steps; returns {returned} "
                   "and what backward needs, each of the step's kept arrays stacked over t.")
    backward_doc = (f"Backward pass of {layer.kind} (backpropagation through time): "
                    f"{cell_backward}, the derived backward of one step, for t = T-1..0, the "
                    "state's gradient handed to the step before and the weights' gradients "
                    "summed over t. input_grad is accepted for the caller; the steps' input "
                    "gradients are computed anyway (the state gradient needs the same work).")
    source = builder.env.get_template("unrolled.py.j2").render(
        forward_doc=_docstring(forward_doc),
        backward_doc=_docstring(backward_doc),
        forward=forward_function(stem),
        backward=backward_function(stem),
        input=form.inputs[0].name,
        params=", ".join(params),
        state=state_array.name,
        width=width,
        sequence=sequence,
        cell_forward=cell_forward,
        cell_backward=cell_backward,
        upstream=derivation.upstream.name,
        kept=", ".join(kept),
        first_kept=kept[0],
        kept_at_t=", ".join(f"{name}[t]" for name in kept),
        read=", ".join(read),
        grads=grads,
        step_grads=", ".join(f"{g}_t" for g in grads),
        grad_pairs=[(g, f"{g}_t") for g in grads],
    ).rstrip("\n")
    del step_input
    forward, backward = source.split("\n\n\n")
    builder.functions[forward_function(stem)] = _Function(forward_function(stem), forward)
    builder.functions[backward_function(stem)] = _Function(backward_function(stem), backward)
    builder.forward_names[stem] = forward_function(stem)
    for name in (forward_function(stem), backward_function(stem)):
        builder.overwrites[name] = False
        builder.size_keywords[name] = []
        builder.outs[name] = []
    builder.owned_output[stem] = True
    builder.owned_grad[stem] = True


def _docstring(text: str) -> str:
    """``text`` as a function's docstring, indented, within the line length."""
    return textwrap.indent(textwrap.fill(f'"""{text}"""', MAX_LINE - 4), "    ")
