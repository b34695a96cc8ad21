"""The layer functions of a layer unrolled over time (rnn, lstm: :mod:`symbp.derivation.unrolled`).

Each of the cell's parts is printed by the builder like any layer, by the builder's printer
(NumPy, torch, JAX; its stem ``<stem>_cell``, or ``<stem>_cell_<state>`` where the cell has
several parts); the builder's ``unrolled_template`` holds the loops over the steps around them
(``templates/unrolled.py.j2``: a Python loop over t, ``torch_unrolled.py.j2`` the same with
torch's allocations, ``jax_unrolled.py.j2`` ``jax.lax.scan``), so the network calls
``<stem>_forward(x, *params)`` and ``<stem>_backward(dy, *kept, *params_read)`` as it calls any
layer's. What every target's loop reads is computed once, here (:func:`unrolled_context`), and
is structure only: which value each part reads at step t, the sum of the gradients of a value
two parts read, the states' gradients handed to the step before, the weights' gradients summed
over t and the gate blocks of a stacked parameter; every formula is in the parts' derived
functions.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ..naming import adjoint, backward_function, forward_function
from .layout import MAX_LINE

if TYPE_CHECKING:
    from ..declare.base import Layer
    from ..derivation.unrolled import UnrolledDerivation
    from .module import ModuleBuilder

#: each target's call splitting a parameter into its blocks of rows, and stacking them again
SPLIT = {"np": "np.split", "torch": "torch.tensor_split", "jnp": "jnp.split"}
CONCAT = {"np": "np.concatenate", "torch": "torch.cat", "jnp": "jnp.concatenate"}


def unrolled_context(builder: ModuleBuilder, stem: str, layer: Layer,
                     derivation: UnrolledDerivation) -> dict:
    """Print the cell's parts' functions into ``builder``; return what the loops' template
    reads (every target's)."""
    cell, parts, labels = derivation.cell, derivation.parts, derivation.part_states
    stems = [f"{stem}_cell" if len(parts) == 1 else f"{stem}_cell_{label}" for label in labels]
    for part_stem, part_layer, part in zip(stems, cell.parts, parts, strict=True):
        builder.layer_functions(part_stem, part_layer, part, None)
    xp = builder.array_module
    form = derivation.form
    x = form.inputs[0].name
    states = [(state, _width(derivation, state)) for state in cell.states]
    kept = derivation.kept_names
    own = [name for name in kept if derivation.kept_role(name)[0] == "own"]
    forward_steps, scan_steps = [], []
    for part_stem, part, label in zip(stems, parts, labels, strict=True):
        params = [p.name for p in part.form.params]
        cache = _tuple([a.name if a.name in own else "_" for a in part.cached])
        for lines, scan in ((forward_steps, False), (scan_steps, True)):
            args = [_value_at_t(derivation, a.name, x, scan=scan) for a in part.form.inputs]
            call = f"{builder.forward_names[part_stem]}({', '.join(args + params)})"
            lines.append(f"{label}_new, {cache} = {call}")
    values = {"input": f"{x}.swapaxes(0, 1)", "state": "{}_all[:-1]", "new": "{}_all[1:]",
              "own": "{}_steps"}
    kept_values = [values[role].format(name) for role, name in map(derivation.kept_role, kept)]
    sequence = len(form.output.array.dims) == 3
    part_params = [p.name for part in parts for p in part.form.params]
    grads = [adjoint(name) for name in dict.fromkeys(part_params)]
    read = [p.name for p in derivation.params_read]
    loop = builder.unrolled_loop
    forward_doc = (
        f"Forward pass of {layer.kind}: {_calls(builder, stems)} at t = 0..T-1{loop} (the "
        f"states {', '.join(cell.states)} 0 before the first step), the weights shared by the "
        f"steps; returns {'the states (N, T, H)' if sequence else 'the last state'} and what "
        "backward needs, each array the steps' backward reads over t (T, N, ...).")
    backward_doc = (
        f"Backward pass of {layer.kind} (backpropagation through time): "
        f"{_calls(builder, stems, backward=True)}, the derived backward of one step, for "
        f"t = T-1..0{loop}, each state's gradient handed to the step before, the gradients of "
        "a value two parts read summed, the weights' gradients summed over t. input_grad is "
        "accepted for the caller; the steps' input gradients are computed anyway (the state "
        "gradient needs the same work).")
    return dict(
        forward_doc=_docstring(forward_doc),
        backward_doc=_docstring(backward_doc),
        xp=xp,
        forward=forward_function(stem),
        backward=backward_function(stem),
        input=x,
        params=", ".join(p.name for p in form.params),
        blocks=_blocks(derivation, [p.name for p in form.params], part_params, SPLIT[xp]),
        states=states,
        own=own,
        own_tuple=_tuple(own),
        own_steps=_tuple([f"{name}_steps" for name in own], brackets=False),
        forward_steps=forward_steps,
        kept_values=kept_values,
        sequence=sequence,
        upstream=derivation.upstream.name,
        kept=[a.name for a in derivation.cached],
        read=", ".join(read),
        read_blocks=_blocks(derivation, read, part_params, SPLIT[xp]),
        grads=grads,
        reused=[f"{adjoint(p)}_t" for part_stem in stems
                for p in builder.outs.get(backward_function(part_stem), [])],
        backward_steps=_backward_steps(builder, derivation, stems, "{}_steps[t]"),
        backward_steps_t=_backward_steps(builder, derivation, stems, "{}_t"),
        assembled=[line for p in form.params
                   for line in _assembled(derivation, p.name, part_params, CONCAT[xp])],
        returned=[adjoint(p.name) for p in form.params],
        # jax.lax.scan's step (the JAX target): the states carried, the arrays kept at t
        state_tuple=_tuple([s for s, _ in states], brackets=False),
        new_tuple=_tuple([f"{s}_new" for s, _ in states]),
        zero_tuple=_tuple(["zero"] * len(states)),
        dstate_tuple=_tuple([adjoint(s) for s, _ in states]),
        scan_steps=scan_steps,
        kept_scan=_tuple([_value_at_t(derivation, name, x, scan=True) for name in kept]),
        kept_t_tuple=_tuple([f"{name}_t" for name in kept]),
        grads_t_tuple=_tuple([f"{g}_t" for g in grads]),
        grads_tuple=_tuple(grads),
        grad_shapes=_grad_shapes(derivation),
        last_carry=_tuple([f"{derivation.upstream.name}.astype(dtype)"]
                          + [f"jnp.zeros_like({derivation.upstream.name}, dtype)"]
                          * (len(states) - 1)),
    )


def unrolled_functions(builder: ModuleBuilder, stem: str, layer: Layer,
                       derivation: UnrolledDerivation) -> None:
    """Print the cell's parts' functions and the layer's loops around them into ``builder``."""
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
    builder.owned_output[stem] = context["sequence"]  # else a view of the states kept
    builder.owned_grad[stem] = True


def _backward_steps(builder: ModuleBuilder, derivation: UnrolledDerivation,
                    stems: list[str], at_t: str) -> list[str]:
    """The loop body of BPTT at step t: the parts' backward in reverse order, each gradient
    of a value read by several parts (the step's input, a state before or after the step)
    the sum of theirs, assigned at the first and added at the others (``at_t``: a kept
    array's value at t, from its name)."""
    x = derivation.step_input
    assigned = {adjoint(f"{state}_new") for state in derivation.cell.states}
    lines = []
    for part_stem, part, label in reversed(list(zip(stems, derivation.parts,
                                                    derivation.part_states, strict=True))):
        targets, sums = [], []
        for a in part.form.differentiable:
            if a in part.form.params:
                targets.append(f"{adjoint(a.name)}_t")
                continue
            total = "dx_t" if a.name == x else adjoint(a.name)
            if total in assigned:
                targets.append(f"{adjoint(a.name)}_{label}")
                sums.append(f"{total} = {total} + {adjoint(a.name)}_{label}")
            else:
                targets.append(total)
                assigned.add(total)
        kept = [at_t.format(a.name) for a in part.cached]
        read = [p.name for p in part.params_read]
        # the weights' gradients of step t + 1, added up already: written over at step t
        reused = [f"{adjoint(p)}_out={adjoint(p)}_t"
                  for p in builder.outs.get(backward_function(part_stem), [])]
        args = ", ".join([part.upstream.name, *kept, *read, *reused])
        call = f"{backward_function(part_stem)}({args})"
        lines += [f"{', '.join(targets)} = {call}", *sums]
    for state in derivation.cell.states:  # a state no part reads hands back nothing
        if adjoint(state) not in assigned:
            lines.append(f"{adjoint(state)} = {builder.array_module}.zeros_like("
                         f"{adjoint(state)})")
    return lines


def _value_at_t(derivation: UnrolledDerivation, name: str, x: str, scan: bool = False) -> str:
    """What a part's input or kept array ``name`` is at step t, in the loop over t or in
    ``jax.lax.scan``'s step (``scan``: the step's input ``x_t``, the states carried)."""
    role, value = derivation.kept_role(name)
    if scan:
        return {"input": f"{x}_t", "state": value, "new": f"{value}_new", "own": name}[role]
    return {"input": f"{x}[:, t]", "state": f"{value}_all[t]", "new": f"{value}_new"}[role]


def _grad_shapes(derivation: UnrolledDerivation) -> list[str]:
    """Each part parameter's gradient's shape as code, its sizes read off what the backward
    is given: the parameters it reads (their blocks) and the arrays kept over t."""
    arrays = [(p.name, p.dims, 0) for part in derivation.parts for p in part.params_read]
    kept = {a.name: a for part in derivation.parts for a in part.cached}
    arrays += [(steps.name, kept[name].dims, 1)
               for steps, name in zip(derivation.cached, derivation.kept_names, strict=True)]
    read = {p.name for part in derivation.parts for p in part.params_read}
    shapes = {}
    for part in derivation.parts:
        for p in part.form.params:
            if p.name in read:
                shapes.setdefault(p.name, f"{p.name}.shape")
                continue
            sizes = [next(f"{name}.shape[{offset + axis}]" for name, dims, offset in arrays
                          for axis, d in enumerate(dims) if d == dim) for dim in p.dims]
            shapes.setdefault(p.name, _tuple(sizes))
    return list(shapes.values())


def _width(derivation: UnrolledDerivation, state: str) -> str:
    """The state's width read off a parameter's shape (``W_hh.shape[1]``)."""
    dims = next(a.dims for part in derivation.parts for a in part.form.inputs
                if a.name == state)
    return next(f"{p.name}.shape[{axis}]" for p in derivation.form.params
                for axis, dim in enumerate(p.dims) if dim == dims[-1])


def _blocks(derivation: UnrolledDerivation, layer_params: list[str],
            part_params: list[str], split: str) -> list[str]:
    """``W_ii, W_if, W_ig, W_io = np.split(W_ih, 4)``: the parts' parameters that are blocks of
    rows of ``layer_params`` (views)."""
    lines = []
    for name in layer_params:
        blocks = sorted({derivation.cell.blocks[p][1:] + (p,) for p in part_params
                         if derivation.cell.blocks.get(p, (None,))[0] == name})
        if blocks:
            count = blocks[0][1]
            if [index for index, _, _ in blocks] != list(range(count)):
                raise ValueError(f"the cell's parts have not every block of {name}")
            lines.append(f"{', '.join(p for _, _, p in blocks)} = {split}({name}, {count})")
    return lines


def _assembled(derivation: UnrolledDerivation, name: str, part_params: list[str],
               concat: str) -> list[str]:
    """The gradient of the layer's parameter ``name`` where it is its blocks' stacked."""
    blocks = sorted((derivation.cell.blocks[p][1], p) for p in dict.fromkeys(part_params)
                    if derivation.cell.blocks.get(p, (None,))[0] == name)
    if not blocks:
        return []
    return [f"{adjoint(name)} = {concat}({_tuple([adjoint(p) for _, p in blocks])})"]


def _calls(builder: ModuleBuilder, stems: list[str], backward: bool = False) -> str:
    names = [backward_function(s) if backward else builder.forward_names[s] for s in stems]
    return " then ".join(reversed(names) if backward else names)


def _tuple(names: list[str], brackets: bool = True) -> str:
    text = ", ".join(names) + ("," if len(names) == 1 else "")
    return f"({text})" if brackets else text


def _docstring(text: str) -> str:
    """``text`` as a function's docstring, indented, within the line length."""
    return textwrap.indent(textwrap.fill(f'"""{text}"""', MAX_LINE - 4), "    ")
