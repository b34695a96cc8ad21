"""Layer by layer: each layer's backward against finite differences of that layer alone.

A whole-network finite difference perturbs one number and reruns the whole network; through
64 batch norms at batch 4 the loss's rounding noise swamps the difference, and checking every
layer's entries that way costs (entries) x (depth): quadratic in depth (issue 27). Here the
network plan (:mod:`symbp.derivation.plan`) is executed with the module's own layer functions:

* **forward**, once: every value (the network's input ``x``, each step's output), each step's
  cache and random draws (rrelu's slopes, drawn as the generated ``forward`` draws them); the
  output must be the module's ``forward``'s, bit for bit (the same functions on the same
  arrays), else the module's forward is not the plan's and a row says so;
* **backward**, once, by the textbook reverse sweep over the forward steps (not the plan's
  backward list): each step's ``<stem>_backward`` on the upstream gradient of its output, a
  value read by several steps getting the sum of their parts;
* **checks**, one row per gradient: for a value ``v`` read by steps ``r`` and the upstream
  gradients ``g_r`` of their outputs (from the sweep), ``F(u) = sum_r <g_r, f_r(..., v := u,
  ...)>`` has the gradient ``dL/dv`` by the chain rule; for a parameter ``P`` of step ``s``,
  ``F(u) = <g_s, f_s(..., P := u)>``; for the loss, ``F`` is the loss of the output. ``F``
  costs one layer's forward, not the network's, and is as well conditioned as the layer: its
  derivative is estimated entry by entry (a seeded sample, or all) and along one random
  direction, with :func:`~symbp.checking.finite.estimate` and the rounding noise measured
  on ``F`` itself. The gradient compared is the module's own (``loss_and_grads``) for the
  parameters and ``x``, the sweep's for the values in between.

If every row passes, every gradient the module returns is the chain rule's at this point: the
loss's gradient is right, and each layer hands back the right gradient given the right one
from above (induction down the network). A wrong line in one layer's backward fails the rows
of that layer (the row names the layer); a wrong sum in the network's backward (a residual's
skip) fails the parameters below it, whose module gradients no longer match the chain rule.
Each row costs a bounded number of evaluations of one layer: the time grows linearly with
depth.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..declare.net import Net
from ..derivation.network import derive_network
from ..derivation.plan import INPUT, Plan, Step, build_plan
from ..emit.module import ModuleBuilder
from ..emit.network import backward_steps, forward_steps, size_values
from ..naming import backward_function, forward_function


@dataclass
class Calls:
    """How the generated ``forward``/``backward`` call one step's functions."""

    step: Step
    forward: Callable | None  # None: a reshape (no function of its own)
    backward: Callable | None
    forward_keywords: dict
    backward_keywords: dict
    several: bool  # the backward returns a tuple (more than one differentiable argument)


@dataclass
class Sweep:
    """The plan run once forward and once backward with the module's functions."""

    plan: Plan
    calls: dict[str, Calls]
    values: dict[str, np.ndarray]  # every value by name: x and each step's output
    caches: dict[str, tuple]
    draws: dict[str, list[np.ndarray]]
    #: the gradient of each value (complete: every reader's part summed) and of each parameter
    grads: dict[str, np.ndarray]
    param_grads: dict[str, np.ndarray]


def step_calls(net: Net, module: types.ModuleType) -> tuple[Plan, dict[str, Calls], tuple]:
    """The plan and, per step, the module's functions with the keywords the network passes;
    the loss's forward and backward (``None`` without a loss)."""
    derivation = derive_network(net)
    plan = build_plan(net, derivation)
    builder = ModuleBuilder(derivation)
    forward_steps(builder, plan)  # fills in the function names and size keywords
    backward_steps(builder, plan)
    calls = {}
    for step in plan.forward:
        if step.reshape:
            calls[step.name] = Calls(step, None, None, {}, {}, False)
            continue
        stem = builder.stems[step.name] + step.stem_suffix
        forward = builder.forward_names[stem]
        backward = backward_function(stem)
        sizes = size_values(step, step.derivation.form)
        forward_keywords = step.constants() | {
            k: sizes[k] for k in builder.size_keywords.get(forward, [])
        }
        backward_keywords = step.backward_constants() | {
            k: sizes[k] for k in builder.size_keywords.get(backward, [])
        }
        calls[step.name] = Calls(
            step, getattr(module, forward), getattr(module, backward), forward_keywords,
            backward_keywords, len(step.derivation.form.differentiable) > 1,
        )
    loss = None
    if net.loss is not None:
        stem = builder.stems[None]
        loss = (getattr(module, forward_function(stem)), getattr(module, backward_function(stem)))
    return plan, calls, loss


def run_step(calls: Calls, inputs, params, draws) -> tuple:
    """``(output, cache, ...)`` of one step, as the generated ``forward`` computes it."""
    step = calls.step
    if calls.forward is None:
        return (inputs[0].reshape(len(inputs[0]), math.prod(step.placed.in_shape)), ())
    return calls.forward(*inputs, *params, *draws, **calls.forward_keywords)


def run_vjp(calls: Calls, upstream, cache, params: dict) -> tuple:
    """The gradients of the step's inputs, then of its parameters."""
    step = calls.step
    if calls.backward is None:
        return (upstream.reshape(len(upstream), *step.placed.in_shape),)
    read = [params[key] for key in step.params_read]
    result = calls.backward(upstream, *cache, *read, **calls.backward_keywords)
    return result if calls.several else (result,)


def sweep(net: Net, module, params: dict, x: np.ndarray, rng: np.random.Generator,
          dout_of: Callable[[np.ndarray], np.ndarray], prepared=None) -> Sweep:
    """Run the plan forward (drawing from ``rng`` as ``forward`` does) and backward from
    ``dout_of(output)``; ``prepared``: :func:`step_calls`'s result, if the caller has it."""
    plan, calls, _ = prepared or step_calls(net, module)
    values = dict(x) if isinstance(x, dict) else {INPUT: x}  # the inputs by name
    caches: dict[str, tuple] = {}
    draws: dict[str, list[np.ndarray]] = {}
    for step in plan.forward:
        inputs = [values[v] for v in step.inputs]
        drawn = [
            getattr(rng, method)(*args, size=inputs[0].shape).astype(inputs[0].dtype)
            for method, args in step.draws.values()
        ]
        result = run_step(calls[step.name], inputs, [params[k] for k in step.params], drawn)
        values[step.output], caches[step.name], draws[step.name] = result[0], result[1], drawn
    grads = {plan.output: dout_of(values[plan.output])}
    param_grads: dict[str, np.ndarray] = {}
    for step in reversed(plan.forward):  # a value's readers all come after it
        result = run_vjp(calls[step.name], grads[step.output], caches[step.name], params)
        for value, part in zip(step.grad_inputs, result, strict=False):
            grads[value] = grads[value] + part if value in grads else part
        for key, grad in zip(step.params, result[len(step.grad_inputs):], strict=True):
            # a shared parameter: the sum over its uses
            param_grads[key] = param_grads[key] + grad if key in param_grads else grad
    return Sweep(plan, calls, values, caches, draws, grads, param_grads)


def local_function(run: Sweep, params: dict, *, value: str | None = None,
                   param: str | None = None) -> tuple[Callable[[np.ndarray], float], float]:
    """``F`` of the module docstring for a value (its readers) or a parameter (its step), and
    the size of its terms (``sum |g * f|``: a floor for its rounding noise)."""
    plan = run.plan
    if value is not None:
        readers = [plan.step(name) for name in plan.readers.get(value, [])]
    else:
        readers = [s for s in plan.forward if param in s.params]  # (shared: several)

    def evaluate(u: np.ndarray, magnitude: bool = False) -> float:
        total = 0.0
        for step in readers:
            inputs = [u if v == value else run.values[v] for v in step.inputs]
            arrays = [u if k == param else params[k] for k in step.params]
            out = run_step(run.calls[step.name], inputs, arrays, run.draws[step.name])[0]
            upstream = run.grads[step.output]
            product = np.abs(upstream * out) if magnitude else upstream * out
            total += float(np.sum(product))
        return total

    base = run.values[value] if value is not None else params[param]
    return evaluate, evaluate(base, magnitude=True)


def readers_of(plan: Plan, value: str) -> str:
    """The steps whose backward a value's gradient row checks."""
    return ", ".join(plan.readers.get(value, []))
