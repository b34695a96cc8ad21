"""The layer functions of a layer unrolled over time (rnn, :mod:`symbp.derivation.unrolled`).

The cell's forward and backward are printed by the builder like any layer's (their stem with
``_cell``), by the builder's printer (NumPy, torch, JAX); the builder's ``unrolled_template``
holds the loop over the steps around them (``templates/unrolled.py.j2``: a Python loop over t,
``torch_unrolled.py.j2`` the same with torch's allocations, ``jax_unrolled.py.j2``
``jax.lax.scan``), so the network calls ``<stem>_forward(x, *params)`` and
``<stem>_backward(dy, *kept, *params_read)`` as it calls any layer's. What every target's loop
reads (the names, which sizes the state and the gradients take from which array) is computed
once, here, from the derivation.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ..declare.forms import Array
from ..derivation.derivation import LayerDerivation
from ..naming import adjoint, backward_function, forward_function
from .layout import MAX_LINE

if TYPE_CHECKING:
    from ..declare.base import Layer
    from .module import ModuleBuilder


def dim_source(dim, arrays: list[tuple[str, tuple, int]]) -> str:
    """Where a generated function reads the size ``dim``: ``W_ih.shape[0]`` (``arrays``: each
    array's name, its dims and the axis its own dims start at: 1 for the arrays stacked over
    t)."""
    return next(f"{name}.shape[{offset + axis}]" for name, dims, offset in arrays
                for axis, d in enumerate(dims) if d == dim)


def unrolled_context(builder: ModuleBuilder, stem: str, layer: Layer,
                     derivation: LayerDerivation) -> dict:
    """Print the cell's functions into ``builder``; return what the loop's template reads."""
    cell = derivation.cell
    cell_stem = f"{stem}_cell"
    builder.layer_functions(cell_stem, derivation.cell_layer, cell, None)
    form, cell_form = derivation.form, cell.form
    states = list(cell_form.inputs[1:])  # the step's input first, then the state(s)
    params = [p.name for p in cell_form.params]
    grads = [adjoint(p) for p in params]
    kept = [a.name for a in derivation.cached]
    read = [p.name for p in derivation.params_read]
    # the sizes the forward reads off its parameters, the backward off what it is given
    forward_arrays = [(p.name, p.dims, 0) for p in cell_form.params]
    backward_arrays = [(p.name, p.dims, 0) for p in derivation.params_read]
    backward_arrays += [(steps.name, cell_array.dims, 1)
                        for steps, cell_array in zip(derivation.cached, cell.cached, strict=True)]
    sequence = len(form.output.array.dims) == 3
    cell_forward, cell_backward = builder.forward_names[cell_stem], backward_function(cell_stem)
    returned = "the states (N, T, H)" if sequence else "the last state"
    loop = builder.unrolled_loop
    forward_doc = (f"Forward pass of {layer.kind}: {cell_forward} at t = 0..T-1{loop} (the "
                   "state 0 before the first step), the weights shared by the steps; returns "
                   f"{returned} and what backward needs, each of the step's kept arrays stacked "
                   "over t.")
    backward_doc = (f"Backward pass of {layer.kind} (backpropagation through time): "
                    f"{cell_backward}, the derived backward of one step, for t = T-1..0{loop}, "
                    "the state's gradient handed to the step before and the weights' gradients "
                    "summed over t. input_grad is accepted for the caller; the steps' input "
                    "gradients are computed anyway (the state gradient needs the same work).")
    return dict(
        forward_doc=_docstring(forward_doc),
        backward_doc=_docstring(backward_doc),
        xp=builder.array_module,
        forward=forward_function(stem),
        backward=backward_function(stem),
        input=form.inputs[0].name,
        params=", ".join(params),
        state=states[0].name,
        width=dim_source(states[0].dims[1], forward_arrays),
        sequence=sequence,
        cell_forward=cell_forward,
        cell_backward=cell_backward,
        upstream=derivation.upstream.name,
        kept=", ".join(kept),
        first_kept=kept[0],
        kept_at_t=", ".join(f"{name}[t]" for name in kept),
        read=", ".join(read),
        grads=grads,
        grad_shapes=[_shape(p, backward_arrays) for p in cell_form.params],
        step_grads=", ".join(f"{g}_t" for g in grads),
        grad_pairs=[(g, f"{g}_t") for g in grads],
    )


def unrolled_functions(builder: ModuleBuilder, stem: str, layer: Layer,
                       derivation: LayerDerivation) -> None:
    """Print the cell's functions and the layer's loops around them into ``builder``."""
    from .module import _Function  # the builder's record of a printed function

    context = unrolled_context(builder, stem, layer, derivation)
    template = builder.env.get_template(builder.unrolled_template)
    forward, backward = template.render(**context).rstrip("\n").split("\n\n\n")
    builder.functions[forward_function(stem)] = _Function(forward_function(stem), forward)
    builder.functions[backward_function(stem)] = _Function(backward_function(stem), backward)
    builder.forward_names[stem] = forward_function(stem)
    for name in (forward_function(stem), backward_function(stem)):
        builder.overwrites[name] = False
        builder.size_keywords[name] = []
        builder.outs[name] = []
    builder.owned_output[stem] = True
    builder.owned_grad[stem] = True


def _shape(array: Array, arrays: list[tuple[str, tuple, int]]) -> str:
    """A parameter's shape as code, each size read off ``arrays``."""
    if any(name == array.name and not offset for name, _, offset in arrays):
        return f"{array.name}.shape"  # a parameter the backward reads
    sizes = [dim_source(dim, arrays) for dim in array.dims]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def _docstring(text: str) -> str:
    """``text`` as a function's docstring, indented, within the line length."""
    return textwrap.indent(textwrap.fill(f'"""{text}"""', MAX_LINE - 4), "    ")
