"""Gradient flow: why deep networks are hard to train, from the exact Jacobians symbp derives.

The gradient at layer ``l`` is the upstream gradient pushed through the Jacobians of every
layer above it, so it can shrink (sigmoid: each factor at most 1/4) or grow (large weights)
geometrically with depth. This package shows it three ways, on any declared network:

* symbolically (:mod:`.bounds`, :mod:`.chain`, :mod:`.supremum`): each layer's Jacobian read off
  its derived VJP, a bound on its norm that sympy proves (``sup |f'|`` by calculus, ``||W||_2``,
  batch norm's ``|gamma| invstd``), and the bound on the product down to each layer --
  :func:`flow_bounds` returns these rows for printing and for the notes exporter;
* numerically (:mod:`.numeric`), with the generated code at initialization: gradient norms at
  every activation and parameter, the bounds evaluated there, and Jacobian singular values;
* in memory (:mod:`.memory`): what backward keeps from the forward pass, as a formula in the
  batch size, checked against the generated module's cache.

:mod:`.command` is the ``symbp flow`` subcommand. Imports go one way: this package uses
``symbp.declare``, ``derive``, ``emit`` and ``check``; nothing there imports it.
"""

from .bounds import LayerMax, LocalJacobian, OperatorNorm, local_jacobian
from .chain import FlowBound, flow_bounds
from .command import add_flow_parser, run_flow
from .memory import measured_bytes, memory_model, predicted_bytes, total_elements
from .numeric import Measurement, backward_trace, evaluate_bound, measure
from .supremum import Supremum, supremum_abs

__all__ = [
    "FlowBound",
    "LayerMax",
    "LocalJacobian",
    "Measurement",
    "OperatorNorm",
    "Supremum",
    "add_flow_parser",
    "backward_trace",
    "evaluate_bound",
    "flow_bounds",
    "local_jacobian",
    "measure",
    "measured_bytes",
    "memory_model",
    "predicted_bytes",
    "run_flow",
    "supremum_abs",
    "total_elements",
]
