"""A tiny numeric example for the drawing (``symbp graph --example``): the generated NumPy
module run on one sample with a fixed seed, forward and back, along the network plan.

Each value and its gradient come from :func:`~symbp.checking.local.sweep` (the plan's steps run
with the module's own per-layer functions); the part of a value's gradient that each reader
hands back is that reader's VJP again, at the same upstream gradient and cache.
"""

from __future__ import annotations

import numpy as np

from ..declare.net import Net
from ..emit.drawing import Example
from ..emit.module import generate_module
from ..runtime.targets import _one_hot
from .gradcheck import input_arrays, load_module, make_inputs
from .local import run_vjp, step_calls, sweep


def run_example(net: Net, *, seed: int = 0, module=None) -> Example:
    """Values, gradients and each reader's part for one sample (parameters and input as
    ``symbp check`` draws them with ``seed``)."""
    module = module or load_module(generate_module(net))
    params, x, y = make_inputs(net, module, batch=1, seed=seed)
    arrays = input_arrays(net, x)
    prepared = step_calls(net, module)
    loss_functions = prepared[2]
    result: dict = {}

    def dout_of(out):
        if loss_functions is None:  # no loss: the gradient of sum(out * y)
            result["loss"] = None
            return y
        forward, backward = loss_functions
        target = _one_hot(y, out) if net.loss.target_kind == "labels" else y
        loss, cache = forward(out, target)
        result["loss"] = float(loss)
        return backward(*cache)

    run = sweep(net, module, params, arrays, np.random.default_rng(seed), dout_of, prepared)
    parts = {}
    for step in run.plan.forward:
        returned = run_vjp(run.calls[step.name], run.grads[step.output], run.caches[step.name],
                           params)
        parts.update({(v, step.name): g for v, g in zip(step.grad_inputs, returned, strict=False)})
        grads = returned[len(step.grad_inputs):]
        parts.update({(k, step.name): g for k, g in zip(step.params, grads, strict=True)})
    return Example(values=run.values, grads=run.grads, parts=parts, params=params,
                   param_grads=run.param_grads, loss=result["loss"], seed=seed)
