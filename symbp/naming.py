"""Every name symbp turns into a Python identifier, and the rules they must follow.

Layer names become parts of generated function names and parameter keys (``fc1.W``), so they
are validated here, once, for the declaration, the generator and the command line alike.
"""

from __future__ import annotations

import keyword
import re

from .errors import SpecError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Names the generated module defines itself; a layer may not take them.
RESERVED = frozenset(
    {
        "np",
        "numpy",
        "forward",
        "backward",
        "predict",
        "init_params",
        "init_state",
        "loss_and_grads",
        "sgd_step",
        "PARAM_SHAPES",
        "params",
        "cache",
        "state",
        "grads",
        "x",
        "y",
        "rng",
        "train",
        "dout",
        "loss",
    }
)


def check_identifier(name: object, *, what: str = "name") -> str:
    """Return ``name`` if it can be a Python identifier used in generated code, else raise."""
    if not isinstance(name, str):
        raise SpecError(f"{what} must be a string, got {type(name).__name__}", field="name")
    if not _IDENTIFIER.match(name):
        raise SpecError(
            f"{what} {name!r} is not a valid identifier "
            "(letters, digits and '_', not starting with a digit)",
            field="name",
        )
    if keyword.iskeyword(name) or name in RESERVED:
        raise SpecError(f"{what} {name!r} is reserved", field="name")
    return name


def param_key(layer: str, param: str) -> str:
    """The public name of a parameter: ``<layer>.<param>``."""
    return f"{layer}.{param}"


def default_layer_name(layer_type: str, position: int) -> str:
    """The name given to an unnamed layer: its type and 1-based position, e.g. ``relu3``."""
    return f"{layer_type}{position}"


def forward_function(stem: str) -> str:
    """The generated forward function of a layer math: ``<stem>_forward``."""
    return f"{stem}_forward"


def backward_function(stem: str) -> str:
    """The generated backward function of a layer math: ``<stem>_backward``."""
    return f"{stem}_backward"


def predict_function(stem: str) -> str:
    """The generated evaluation-mode forward function of a layer math: ``<stem>_predict``."""
    return f"{stem}_predict"


def state_update_function(stem: str) -> str:
    """The generated function moving a layer's running state (``batchnorm_running_stats``)."""
    return f"{stem}_running_stats"


def adjoint(name: str) -> str:
    """The name of the gradient of the loss with respect to ``name``: ``d<name>``."""
    return f"d{name}"
