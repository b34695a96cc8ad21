"""symbp: derive backpropagation exactly with sympy, generate readable numpy, export notes.

Declare a network (this Python API or a TOML spec), derive every gradient by the chain rule as
exact formulas, generate a NumPy module, check it against finite differences, export notes.

>>> import symbp
>>> net = symbp.Net([symbp.linear(8, name="fc1"), symbp.batchnorm(name="bn1"), symbp.relu(),
...                  symbp.linear(3, name="out")], input_features=4,
...                 loss="softmax_cross_entropy")
>>> derivation = symbp.derive(net)
>>> source = symbp.codegen(net)
"""

__version__ = "0.1.0"

from .declare.layers import (  # noqa: E402 - the version is defined first for the generator
    Activation as activation,
    BatchNorm as batchnorm,
    Elu as elu,
    Gelu as gelu,
    LeakyRelu as leaky_relu,
    Linear as linear,
    Prelu as prelu,
    Relu as relu,
    Residual as residual,
    Rrelu as rrelu,
    Sigmoid as sigmoid,
    Silu as silu,
    Softplus as softplus,
    Tanh as tanh,
)
from .declare.net import Net  # noqa: E402
from .declare.spec import load_spec, parse_spec  # noqa: E402
from .derive.network import derive_network as derive  # noqa: E402
from .emit.module import generate_module as codegen  # noqa: E402
from .errors import DerivationError, SpecError, SymbpError  # noqa: E402


def check(net: Net, *, batch: int = 4, seed: int = 0, full: bool = False):
    """Generate ``net``'s module and compare its gradients with finite differences."""
    from .check.gradcheck import check_spec

    return check_spec(net, batch=batch, seed=seed, full=full)


__all__ = [
    "Net", "activation", "batchnorm", "check", "codegen", "derive", "elu", "gelu", "leaky_relu",
    "linear", "load_spec", "parse_spec", "prelu", "relu", "residual", "rrelu", "sigmoid", "silu",
    "softplus", "tanh", "DerivationError", "SpecError", "SymbpError",
]
