"""The network plan: the ordered forward and backward steps that every output target reads.

A :class:`Plan` is built once from a :class:`~symbp.declare.net.Net` and its derivation. Its
values are named nodes with explicit inputs (the network's input is ``x``; a layer's output is
called by the layer's name), so a graph fits as well as a chain:

* forward :class:`Step`\\ s, in the order they run: which layer's function is applied to which
  values, with which parameters, constants, state, random draws and reshapes, and what it keeps
  for backward (the cache entry of the layer);
* backward steps, in the order they run: a :class:`Vjp` per layer (upstream gradient in,
  gradients of its inputs and parameters out) and a :class:`Sum` wherever a value is read by
  more than one step (a residual block's input: its skip and its body), whose gradient is the
  sum of what each reader hands back.

Code generation prints the plan (:mod:`symbp.emit.network`), ``symbp flow`` runs it with the
generated functions, ``symbp derive`` and the notes render it. Everything that differs between
layer types is read off the layer's declaration (:class:`~symbp.declare.layers.Layer`); this
module tests no layer's type.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import sympy as sp

from ..declare.forms import Forward
from ..declare.layers import Layer
from ..declare.net import Net, Placed
from ..naming import param_key
from .arrays import c_order_position
from .kept import sign_variant
from .layer import LayerDerivation
from .network import NetworkDerivation, derive_cached, derive_network
from .reshape import is_reshape

INPUT = "x"


@dataclass(frozen=True)
class Step:
    """One forward step: ``output = layer(*inputs)``."""

    placed: Placed
    derivation: LayerDerivation
    eval_form: Forward | None
    inputs: tuple[str, ...]
    output: str
    depth: int  # 0 at the top level, 1 inside a block's body, ...
    #: whether gradients reach this step's first input only for the caller (``wrt_input``):
    #: nothing before it has parameters
    input_grad_optional: bool = False
    #: the form the plan chose for what the step keeps (:func:`plan_kept`): ``""``, the
    #: derivation's; ``"mask"``, a step ``(y > 0)`` in place of the array ``y`` it reads through it
    keeps: str = ""

    @property
    def name(self) -> str:
        return self.placed.name

    @property
    def layer(self) -> Layer:
        return self.placed.layer

    @property
    def reshape(self) -> bool:
        """A C-order reshape (flatten), read off the derivation (:mod:`.reshape`)."""
        return is_reshape(self.derivation)

    @property
    def grad_inputs(self) -> tuple[str, ...]:
        """The inputs whose gradients the backward hands back: all but integer ones (ids)."""
        arrays = self.derivation.form.inputs
        return tuple(v for v, a in zip(self.inputs, arrays, strict=True) if not a.integer)

    @property
    def params(self) -> list[str]:
        """Keys of the parameters the forward reads (``fc1.W``; a layer sharing another's
        parameters reads the other's, ``enc.W``)."""
        owner = self.placed.param_owner or self.name
        return [param_key(owner, p.name) for p in self.derivation.form.params]

    @property
    def params_read(self) -> list[str]:
        """Keys of the parameters the backward reads."""
        owner = self.placed.param_owner or self.name
        return [param_key(owner, p.name) for p in self.derivation.params_read]

    @property
    def grads(self) -> list[str]:
        """Keys of the parameter gradients the backward returns."""
        return self.params

    @property
    def state(self) -> list[str]:
        """Keys of the running state the step reads in evaluation and updates in training."""
        return [param_key(self.name, k) for k in self.layer.state_shapes(self.placed.in_shape)]

    @property
    def draws(self) -> dict[str, tuple[str, tuple[float, ...]]]:
        return self.layer.draws()

    @property
    def stem_suffix(self) -> str:
        """Added to the layer's function stem where the step keeps another form
        (``relu_mask_forward``)."""
        return f"_{self.keeps}" if self.keeps else ""

    @property
    def kept(self) -> list[str]:
        """What ``cache[name]`` holds for backward, in order."""
        return [array.name for array in self.derivation.cached]

    def constants(self, exprs=None) -> dict[str, float]:
        """The hyper-parameters used by ``exprs`` (default: the forward), by name."""
        form = self.derivation.form
        values = self.layer.constant_values()
        exprs = exprs if exprs is not None else [s.expr for s in form.stages]
        used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
        return {s.name: values[s.name] for s in form.constants if s in used}

    def backward_constants(self) -> dict[str, float]:
        return self.constants([a.expr for a in self.derivation.vjp.values()])

    def eval_constants(self) -> dict[str, float]:
        if self.eval_form is None:
            return self.constants()
        values = self.layer.constant_values()
        return {s.name: values[s.name] for s in self.eval_form.constants}


@dataclass(frozen=True)
class Vjp:
    """``d<inputs>, d<params> = vjp(step)(d<output>)``: one layer's derived backward."""

    step: Step
    upstream: str  # the gradient arriving at the step's output
    produces: tuple[str, ...]  # the gradients of the step's inputs, in order

    @property
    def name(self) -> str:
        return self.step.name


@dataclass(frozen=True)
class Sum:
    """``target = sum(parts)``: a value read by several steps gets the sum of their gradients."""

    value: str
    target: str
    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"sum {self.value}"


@dataclass(frozen=True)
class Kept:
    """One array a step keeps (``cache[step]``): which array of the forward pass it is.

    ``token`` names the array: steps whose kept arrays have the same token keep one array
    (a ReLU's output is the next linear layer's input). ``padded``: a zero-padded copy of that
    array (a padded convolution's ``xp``). ``view``: not kept on its own but read from the
    kept array ``view`` = (step, array), a padded copy of it (:class:`KeptView`)."""

    step: str
    array: str
    token: int
    padded: bool = False
    view: tuple[str, str] | None = None
    value: str | None = None  # the plan's value it is (a step's input or output), if any


@dataclass(frozen=True)
class KeptView:
    """``holder``'s kept ``array`` read from ``source``'s kept ``source_array``: ``element``,
    in the index notation of ``source``'s forward definition (``xp[n, c, h + padding, w +
    padding]``), at the indices ``indices`` of the unpadded array; or, ``reshaped``, in the
    holder's (``x[n, c*H*W + h*W + w]``, the flat array a later step keeps)."""

    holder: str
    array: str
    source: str
    source_array: str
    element: sp.Expr
    indices: tuple[sp.Symbol, ...]
    #: ``element`` is in ``holder``'s notation: ``source_array`` (flat) at the C-order position
    #: of the holder's indices
    reshaped: bool = False


@dataclass
class Plan:
    net: Net
    derivation: NetworkDerivation
    forward: list[Step]
    backward: list[Vjp | Sum]
    readers: dict[str, list[str]] = field(default_factory=dict)  # value -> steps reading it
    inputs: tuple[str, ...] = (INPUT,)  # the network's inputs
    #: the values no parameter comes before: their gradients are for ``wrt_input`` only
    free: set[str] = field(default_factory=set)
    kept: list[Kept] = field(default_factory=list)  # every kept array, forward order
    views: list[KeptView] = field(default_factory=list)

    def step(self, name: str) -> Step:
        for step in self.forward:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def output(self) -> str:
        return self.forward[-1].output if self.forward else self.inputs[0]

    @property
    def graph(self) -> bool:
        """Whether the network is more than a chain of layers and residual blocks: named
        inputs, a layer reading several values or another than the one before it."""
        if self.inputs != (INPUT,):
            return True
        return any(step.placed.inputs != (previous,) for step, previous in
                   zip(self.forward, self._previous(), strict=True))

    def _previous(self):
        """What each step would read in a chain: the value before it (a block's body's first
        layer: the block's input)."""
        result, last = [], INPUT
        for step in self.forward:
            result.append(step.placed.inputs[0] if step.placed.body else last)
            last = step.output
        return result

    def shared_params(self) -> dict[str, list[str]]:
        """Each parameter read by more than one step (``share``) and the steps, in order."""
        users: dict[str, list[str]] = {}
        for step in self.forward:
            for key in step.params:
                users.setdefault(key, []).append(step.name)
        return {key: names for key, names in users.items() if len(names) > 1}

    def backward_of(self, name: str) -> list[Vjp | Sum]:
        """The backward entries from step ``name``'s output gradient to its input gradient
        (a block: its own VJP, its body's and the sum of the two)."""
        entries = self.backward
        start = next(i for i, e in enumerate(entries) if isinstance(e, Vjp) and e.name == name)
        value = self.step(name).inputs[0]
        readers = self.readers[value]
        if not self.step(name).placed.body or readers[-1] != name:  # not a block
            return entries[start : start + 1]
        sums = [i for i, e in enumerate(entries) if isinstance(e, Sum) and e.value == value]
        end = next(i for i in sums if i > start)
        return entries[start : end + 1]

    def grad_name(self, value: str, reader: str | None = None) -> str:
        """The gradient of ``value``; with ``reader``, the part that one reader hands back."""
        if reader is not None and len(self.readers.get(value, ())) > 1:
            return f"d{value}@{reader}"
        return f"d{value}"


def build_plan(net: Net, derivation: NetworkDerivation | None = None) -> Plan:
    """Order the network's forward and backward steps (see the module docstring)."""
    derivation = derivation or derive_network(net)
    forward: list[Step] = []
    #: the values no parameter is before: their gradients are only for ``wrt_input``
    free = set(net.inputs)

    def place(items: list[Placed], depth: int) -> None:
        for item in items:
            layer = item.layer
            inputs = item.inputs
            if item.body:  # a block: its body reads the block's input as well
                place(item.body, depth + 1)
                inputs = (item.inputs[0], item.body[-1].name)
            optional = depth == 0 and all(v in free for v in inputs)
            if optional and not item.layer.param_shapes(item.in_shape):
                free.add(item.name)
            forward.append(
                Step(
                    item,
                    derive_cached(layer, item.in_shape),
                    layer.eval_form(item.in_shape),
                    inputs,
                    item.name,
                    depth,
                    optional,
                )
            )

    place(net.placed, 0)
    plan = Plan(net, derivation, forward, [], inputs=tuple(net.inputs), free=free)
    for step in forward:
        for value in step.inputs:
            plan.readers.setdefault(value, []).append(step.name)
    plan_kept(plan)
    # Backward: the steps in reverse; a value's gradient is complete once every reader has
    # handed its part back, which in reverse order is at its first reader.
    output = plan.output
    for step in reversed(forward):
        upstream = "dout" if step.output == output else plan.grad_name(step.output)
        produces = tuple(plan.grad_name(v, step.name) for v in step.grad_inputs)
        plan.backward.append(Vjp(step, upstream, produces))
        for value in step.grad_inputs:  # (integer ids have no gradient to sum)
            readers = plan.readers[value]
            if len(readers) > 1 and readers[0] == step.name:
                parts = tuple(plan.grad_name(value, r) for r in reversed(readers))
                plan.backward.append(Sum(value, plan.grad_name(value), parts))
    return plan


# -- what backward keeps ------------------------------------------------------------------------
def kept_arrays(plan: Plan, names=None) -> list[Kept]:
    """Each step's kept arrays (or the arrays ``names(step)``), with the array of the forward
    pass each one is: a step's input is its input value's array, its output a new array unless
    the forward is its input itself (a reshape, an identity), a zero padding of its input a
    padded copy of the input's array."""
    counter = itertools.count()
    tokens = {name: next(counter) for name in plan.inputs}  # value -> the array it is
    kept: list[Kept] = []
    for step in plan.forward:
        form = step.derivation.form
        stage = form.output
        first = form.inputs[0].name
        token = {a.name: tokens[v] for a, v in zip(form.inputs, step.inputs, strict=False)}
        aliases_input = step.reshape or (
            len(step.inputs) == 1
            and len(stage.indices) == form.inputs[0].rank  # (a pooling reduces the rank)
            and stage.expr == form.inputs[0][stage.indices]
        )
        storage = {name: a.name for name, a in step.derivation.kept_storage.items()}
        token[stage.name] = token[first] if aliases_input else next(counter)
        if stage.name in storage:  # a view of an array the step keeps (an rnn's last state)
            token[stage.name] = token.setdefault(storage[stage.name], token[stage.name])
        tokens[step.output] = token[stage.name]
        padded = {s.name for s in form.stages if _unpadding(form, s.name) is not None}
        chosen = [a.name for a in step.derivation.cached] if names is None else names(step)
        values = {a.name: v for a, v in zip(form.inputs, step.inputs, strict=False)}
        values[stage.name] = step.output
        for name in chosen:
            if name in padded:
                kept.append(Kept(step.name, name, token[first], padded=True))
            else:
                held = storage.get(name, name)
                kept.append(Kept(step.name, name, token.setdefault(held, next(counter)),
                                 value=values.get(held)))
    return kept


def _unpadding(form: Forward, name: str):
    """For a stage that zero-pads the layer's input (``xp[n, c, u, v] = x[n, c, u - P, v - P]``),
    the input's element read from it (``xp[n, c, h + P, w + P]``) and the input's indices
    ``(n, c, h, w)``; else None."""
    stage = next((s for s in form.stages if s.name == name), None)
    if stage is None or len(form.inputs) != 1 or not isinstance(stage.expr, sp.Indexed):
        return None
    x = form.inputs[0]
    if stage.expr.base != x.base or stage.array.dims == x.dims:
        return None
    indices = form.indices_for(x)
    solved = []
    for own, read, at in zip(stage.indices, stage.expr.indices, indices, strict=True):
        shift = sp.expand(read - own)
        if shift.has(*stage.indices):
            return None
        solved.append(at - shift)  # read = own + shift at own = at - shift
    return stage.array[tuple(solved)], indices


def plan_kept(plan: Plan) -> None:
    """Decide what each step keeps, so that backward keeps each array once, in the cheapest
    form that gives it what it reads:

    * an array that a later step keeps as a zero-padded copy (the next convolution's ``xp``)
      is read from that copy (a view of its interior) by the steps that keep it too;
    * an element-wise step whose VJP reads its kept array only through a step (ReLU's
      ``step(y)``) keeps the step, a bool array, unless another step keeps that array anyway.

    Max pooling's arg-max in place of its input is the layer's own derivation
    (:func:`~symbp.derivation.kept.argmax_values`)."""
    kept = kept_arrays(plan)
    others = {}
    for entry in kept:
        others.setdefault(entry.token, []).append(entry)
    for index, step in enumerate(plan.forward):
        variant = sign_variant(step.derivation)
        if variant is None or step.eval_form is not None:
            continue
        mine = [e for e in kept if e.step == step.name]
        if any(e2.step != step.name for e in mine for e2 in others[e.token]):
            continue  # another step keeps the array: reading it costs nothing
        plan.forward[index] = dataclasses.replace(step, derivation=variant, keeps="mask")
    kept = kept_arrays(plan)
    for entry in [e for e in kept if e.padded]:
        step = plan.step(entry.step)
        element, indices = _unpadding(step.derivation.form, entry.array)
        for i, other in enumerate(kept):
            holder = plan.step(other.step)
            if (other.token != entry.token or other.padded or other.view is not None
                    or holder.eval_form is not None):
                continue
            kept[i] = dataclasses.replace(other, view=(entry.step, entry.array))
            plan.views.append(KeptView(other.step, other.array, entry.step, entry.array,
                                       element, indices))
    # A reshape (flatten) of an array that is not contiguous in memory copies it: the array
    # before and the one after are two. What a step keeps before the reshape is then read from
    # what a step after it keeps, reshaped back (a view either way).
    for reshape in (step for step in plan.forward if step.reshape):
        after = next((e for e in kept if e.value == reshape.output and e.view is None), None)
        if after is None:
            continue
        flat = plan.step(after.step).derivation.form.arrays[after.array]
        for i, other in enumerate(kept):
            holder = plan.step(other.step)
            if (other.value != reshape.inputs[0] or other.view is not None
                    or holder.eval_form is not None):
                continue
            form = holder.derivation.form
            indices = form.indices_for(form.arrays[other.array])
            dims = form.arrays[other.array].dims
            element = flat[indices[0], c_order_position(indices[1:], dims[1:])]
            kept[i] = dataclasses.replace(other, view=(after.step, after.array))
            plan.views.append(KeptView(other.step, other.array, after.step, after.array,
                                       element, indices, reshaped=True))
    plan.kept = kept
