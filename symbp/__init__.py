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

import os

from .checking import gradcheck as _gradcheck
from .declare.attention import (
    Attention as attention,
)
from .declare.canon import (
    Dropout as dropout,
)
from .declare.canon import (
    GlobalAvgPool as global_avgpool,
)
from .declare.canon import (
    GroupNorm as group_norm,
)
from .declare.canon import (
    LayerNorm as layer_norm,
)
from .declare.canon import (
    LogSoftmax as log_softmax,
)
from .declare.canon import (
    Softmax as softmax,
)
from .declare.conv import (
    AvgPool2d as avgpool2d,
)
from .declare.conv import (
    Conv2d as conv2d,
)
from .declare.conv import (
    Flatten as flatten,
)
from .declare.conv import (
    MaxPool2d as maxpool2d,
)
from .declare.conv_transpose import (
    ConvTranspose2d as conv_transpose2d,
)
from .declare.custom import (
    Custom as layer,
)
from .declare.embedding import (
    Embedding as embedding,
)
from .declare.graph import (
    Addition as add,
)
from .declare.graph import (
    Concat as concat,
)
from .declare.graph import (
    Matmul as matmul,
)
from .declare.graph import (
    Multiplication as multiply,
)
from .declare.graph import (
    Split as split,
)
from .declare.layers import (
    Activation as activation,
)
from .declare.layers import (
    BatchNorm as batchnorm,
)
from .declare.layers import (
    Elu as elu,
)
from .declare.layers import (
    Gelu as gelu,
)
from .declare.layers import (
    LeakyRelu as leaky_relu,
)
from .declare.layers import (
    Linear as linear,
)
from .declare.layers import (
    Prelu as prelu,
)
from .declare.layers import (
    Relu as relu,
)
from .declare.layers import (
    Residual as residual,
)
from .declare.layers import (
    Rrelu as rrelu,
)
from .declare.layers import (
    Sigmoid as sigmoid,
)
from .declare.layers import (
    Silu as silu,
)
from .declare.layers import (
    Softplus as softplus,
)
from .declare.layers import (
    Tanh as tanh,
)
from .declare.net import Net
from .declare.spec import load_spec, parse_spec
from .derivation.network import derive_network as _derive_network
from .emit.module import generate_module as _generate_module
from .errors import DerivationError, SpecError, SymbpError
from .version import __version__ as __version__  # re-exported: symbp.__version__


def _as_net(net) -> Net:
    """``net`` itself, or the network of the spec file it names."""
    if isinstance(net, Net):
        return net
    if isinstance(net, str | os.PathLike):
        return load_spec(net)
    raise SpecError(f"expected a symbp.Net or the path of a spec, got {type(net).__name__}")


def derive(net):
    """Derive every layer's backward pass for ``net`` (a :class:`Net` or a spec path): a
    ``NetworkDerivation`` (``.layer("bn1").derivation.vjp``)."""
    return _derive_network(_as_net(net))


def codegen(net, target: str = "numpy") -> str:
    """The generated module's source for ``net`` (a :class:`Net` or a spec path): NumPy's, or
    with ``target="torch"`` a PyTorch module (an ``nn.Module`` with the derived backward), with
    ``target="jax"`` JAX's (``jax.custom_vjp`` functions, ``init`` and ``apply``)."""
    if target == "torch":
        from .emit.torch_module import generate_torch_module, require_torch

        require_torch()
        return generate_torch_module(_as_net(net))
    if target == "jax":
        from .emit.jax_module import generate_jax_module

        return generate_jax_module(_as_net(net))
    if target != "numpy":
        raise SpecError(f"target must be one of numpy, torch, jax, got {target!r}")
    return _generate_module(_as_net(net))


def notes(
    net,
    fmt: str = "md",
    *,
    steps: bool = False,
    notation: str = "d2l",
    fragment: bool = False,
    flow: bool = False,
    numbering: str = "all",
):
    """Study notes for ``net`` (a :class:`Net` or the path of a TOML spec): a ``Notes`` object
    whose ``str()`` is the text in ``fmt`` (``"md"`` or ``"tex"``) and which Jupyter displays
    rendered; ``flow=True`` adds the gradient-flow bounds; ``numbering="params"`` numbers only
    the layers with parameters (``W^{(2)}`` is the second weight layer)."""
    from .emit.notes import FORMATS, NOTATIONS, NUMBERINGS, make_notes

    _flags(steps=steps, fragment=fragment, flow=flow)
    if fmt not in FORMATS:
        raise SpecError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if notation not in NOTATIONS:
        raise SpecError(f"notation must be one of {', '.join(NOTATIONS)}, got {notation!r}")
    if numbering not in NUMBERINGS:
        raise SpecError(f"numbering must be one of {', '.join(NUMBERINGS)}, got {numbering!r}")
    derivation = derive(net)
    rows = None
    if flow:
        from .flow.chain import flow_bounds

        rows = flow_bounds(derivation)
    return make_notes(
        derivation,
        steps=steps,
        notation=notation,
        fragment=fragment,
        flow=rows,
        fmt=fmt,
        numbering=numbering,
    )


def check(net, *, batch: int = 4, seed: int = 0, full: bool = False):
    """Generate the module of ``net`` (a :class:`Net` or a spec path) and compare its
    gradients with finite differences.
    """
    _flags(full=full)
    return _gradcheck.check_spec(_as_net(net), batch=batch, seed=seed, full=full)


def _flags(**flags) -> None:
    """Refuse a keyword that must be True or False given anything else (``steps="yes"``),
    as a spec's ``bias = "yes"`` is refused."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise SpecError(f"must be True or False, got {value!r}", field=name)


__all__ = [
    "Net",
    "activation",
    "add",
    "attention",
    "avgpool2d",
    "batchnorm",
    "check",
    "codegen",
    "concat",
    "conv2d",
    "conv_transpose2d",
    "derive",
    "dropout",
    "elu",
    "embedding",
    "flatten",
    "gelu",
    "global_avgpool",
    "group_norm",
    "layer",
    "layer_norm",
    "leaky_relu",
    "linear",
    "load_spec",
    "log_softmax",
    "matmul",
    "maxpool2d",
    "multiply",
    "notes",
    "parse_spec",
    "prelu",
    "relu",
    "residual",
    "rrelu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "split",
    "tanh",
    "DerivationError",
    "SpecError",
    "SymbpError",
]
