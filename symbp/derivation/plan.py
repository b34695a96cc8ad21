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

from dataclasses import dataclass, field

from ..declare.forms import Forward
from ..declare.layers import Layer
from ..declare.net import Net, Placed
from ..naming import param_key
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
    def params(self) -> list[str]:
        """Keys of the parameters the forward reads (``fc1.W``)."""
        return [param_key(self.name, p.name) for p in self.derivation.form.params]

    @property
    def params_read(self) -> list[str]:
        """Keys of the parameters the backward reads."""
        return [param_key(self.name, p.name) for p in self.derivation.params_read]

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


@dataclass
class Plan:
    net: Net
    derivation: NetworkDerivation
    forward: list[Step]
    backward: list[Vjp | Sum]
    readers: dict[str, list[str]] = field(default_factory=dict)  # value -> steps reading it

    def step(self, name: str) -> Step:
        for step in self.forward:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def output(self) -> str:
        return self.forward[-1].output if self.forward else INPUT

    def backward_of(self, name: str) -> list[Vjp | Sum]:
        """The backward entries from step ``name``'s output gradient to its input gradient
        (a block: its own VJP, its body's and the sum of the two)."""
        entries = self.backward
        start = next(i for i, e in enumerate(entries) if isinstance(e, Vjp) and e.name == name)
        value = self.step(name).inputs[0]
        readers = self.readers[value]
        if len(readers) == 1 or readers[-1] != name:  # not a block closing a fan-out
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

    def place(items: list[Placed], value: str, depth: int) -> str:
        for item in items:
            layer = item.layer
            inputs = (value,)
            if item.body:  # a block: its body reads the block's input as well
                inputs = (value, place(item.body, value, depth + 1))
            optional = depth == 0 and not any(
                s.params or s.placed.body for s in forward if s.depth == 0
            )
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
            value = item.name
        return value

    place(net.placed, INPUT, 0)
    plan = Plan(net, derivation, forward, [])
    for step in forward:
        for value in step.inputs:
            plan.readers.setdefault(value, []).append(step.name)
    # Backward: the steps in reverse; a value's gradient is complete once every reader has
    # handed its part back, which in reverse order is at its first reader.
    output = plan.output
    for step in reversed(forward):
        upstream = "dout" if step.output == output else plan.grad_name(step.output)
        produces = tuple(plan.grad_name(v, step.name) for v in step.inputs)
        plan.backward.append(Vjp(step, upstream, produces))
        for value in step.inputs:
            readers = plan.readers[value]
            if len(readers) > 1 and readers[0] == step.name:
                parts = tuple(plan.grad_name(value, r) for r in reversed(readers))
                plan.backward.append(Sum(value, plan.grad_name(value), parts))
    return plan
