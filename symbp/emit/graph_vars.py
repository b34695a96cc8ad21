"""Which variable of the generated ``forward``/``backward`` holds each value and gradient.

The chain's current value lives in ``h`` (its gradient in ``dh``); a value that a step reads
when it is no longer in ``h`` (a residual block's input, a branch of a graph) is held, right
after the step that computes it, as ``skip_<reader>`` (``skip_<reader>_<value>`` for a reader
holding several); a network input other than the first is its argument of ``forward``. Going
back, a gradient goes into ``dh`` when the next backward entry reads it, else into a variable
of its own: ``dskip_<reader>`` for the part one reader hands back (summed where the plan's
``Sum`` says), ``d_<value>`` for a whole gradient. For a chain with residual blocks these are
the names the module always had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..derivation.plan import Plan, Sum, Vjp


def ident(value: str) -> str:
    """A value's name as part of a variable name (a split's part ``s.0``: ``s_0``)."""
    return value.replace(".", "_")


@dataclass
class Variables:
    """The variables of one plan (see the module docstring)."""

    reads: dict[str, list[str]] = field(default_factory=dict)  # step -> each input's variable
    holds: dict[int, list[str]] = field(default_factory=dict)  # row -> variables set to h
    upstream: dict[int, str] = field(default_factory=dict)  # backward entry -> its input
    targets: dict[int, list[str]] = field(default_factory=dict)  # entry -> gradients' vars
    parts: dict[int, list[str]] = field(default_factory=dict)  # Sum entry -> its parts' vars
    inputs: dict[str, str] = field(default_factory=dict)  # network input -> its gradient's var


def variables(plan: Plan) -> Variables:
    result = Variables()
    produced_at = {value: -1 for value in plan.inputs[:1]}  # -1: h before the first step
    produced_at.update({step.output: i for i, step in enumerate(plan.forward)})
    for i, step in enumerate(plan.forward):
        held = [v for v in step.inputs if not _from_h(plan, step, v, i, produced_at)
                and v not in plan.inputs[1:]]
        reads = []
        for value in step.inputs:
            if value in plan.inputs[1:]:
                reads.append(value)  # forward's argument
            elif value not in held:
                reads.append("h")
            else:
                variable = f"skip_{ident(step.name)}"
                if len(held) > 1:
                    variable += f"_{ident(value)}"
                reads.append(variable)
                result.holds.setdefault(produced_at[value] + 1, []).append(variable)
        result.reads[step.name] = reads
    # Backward: the gradient the next entry reads lives in dh; each is produced once.
    entries = plan.backward
    where = {"dout": "dh"}
    for i, entry in enumerate(entries):
        wanted = _read_next(plan, entries, i)
        produced = [entry.target] if isinstance(entry, Sum) else list(entry.produces)
        several = sum(1 for g in produced if g not in wanted and "@" in g) > 1
        if isinstance(entry, Sum):
            result.parts[i] = [where[p] for p in entry.parts]
        else:
            result.upstream[i] = where[entry.upstream]
        result.targets[i] = ["dh" if g in wanted else _held(g, several) for g in produced]
        where.update(zip(produced, result.targets[i], strict=True))
    for name in plan.inputs:
        if plan.grad_name(name) in where:  # (integer ids have no gradient)
            result.inputs[name] = where[plan.grad_name(name)]
    return result


def _from_h(plan: Plan, step, value: str, i: int, produced_at: dict) -> bool:
    """Whether ``step`` (the ``i``-th) reads ``value`` from ``h``: it is the value's first
    reader and runs right after the step that computes it."""
    return produced_at.get(value) == i - 1 and plan.readers[value][0] == step.name


def _read_next(plan: Plan, entries, i: int) -> set[str]:
    """The gradient the entry after the ``i``-th reads from ``dh`` (after the last: the
    first input's)."""
    following = entries[i + 1] if i + 1 < len(entries) else None
    if isinstance(following, Vjp):
        return {following.upstream}
    if isinstance(following, Sum):
        return {following.parts[-1]}
    return {plan.grad_name(plan.inputs[0])}


def _held(gradient: str, several: bool = False) -> str:
    """The variable of a gradient that is not read next."""
    if "@" in gradient:  # the part one reader hands back
        value, reader = gradient[1:].split("@", 1)
        return f"dskip_{ident(reader)}" + (f"_{ident(value)}" if several else "")
    return f"d_{ident(gradient[1:])}"


def template_inputs(plan: Plan, names: Variables) -> dict:
    """The template's values for the network's inputs: one ``x``, or several named ones."""
    args = ", ".join(plan.inputs)
    if plan.inputs == ("x",):
        return dict(args="x", first="x", named_inputs=None, named_ids=False)
    shapes = plan.net.inputs
    ids = plan.net.ids
    floats = [name for name in plan.inputs if name not in ids]
    return dict(args=args, first=plan.inputs[0], floats=", ".join(floats), named_ids=bool(ids),
                named_inputs=[
                    dict(name=name, shape=tuple(shapes[name]), grad=names.inputs.get(name),
                         ids=ids.get(name))
                    for name in plan.inputs
                ])


def chained_rows(plan: Plan):
    """For a target whose engine chains the backward rules (torch, JAX): each forward step,
    the variables it reads, and the start of its row (the values held before it, a reshape)."""
    names = variables(plan)
    for index, step in enumerate(plan.forward):
        inputs = names.reads[step.name]
        row: dict = dict(name=step.name, holds=names.holds.get(index, []), reshape=None,
                         modes=False)
        if step.reshape:
            width, source = math.prod(step.placed.in_shape), inputs[0]
            row["reshape"] = f"h = {source}.reshape(len({source}), {width})  # {step.name}"
        yield step, inputs, row

