"""The base of every layer type: :class:`Layer`, the registry, and the declaration helpers.

Registering a class (``@register``) makes its ``kind`` available to the Python API, the TOML
loader, the derivation engine, both printers and the command line. A layer type declares its
forward computation (:meth:`Layer.forward_form`, in index notation; its backward pass is
derived) and, as class attributes and hooks, whatever else differs between layer types: state,
random draws, evaluation forms, initialisation (see :class:`Layer`).

Shapes here are per sample (batch excluded): ``(features,)`` for the dense layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import sympy as sp

from ..errors import SpecError
from ..naming import check_identifier
from .forms import Forward, N, size

REGISTRY: dict[str, type[Layer]] = {}

#: The scalar variable that activation expressions are written in.
X = sp.Symbol("x", real=True)

# Feature sizes used by the dense layers' forward definitions.
F = size("F")
F_IN = size("I")
F_OUT = size("O")
#: per-sample sizes of images (channels, height, width), as the image layers name them
IMAGE_DIMS = (size("C"), size("H_in"), size("W_in"))
#: per-sample sizes of sequences (positions, features at each position)
SEQ_DIMS = (size("T"), size("D"))
LETTERS = {N: "n", F: "j", F_IN: "i", F_OUT: "j", **dict(zip(IMAGE_DIMS, "chw", strict=True)),
           **dict(zip(SEQ_DIMS, "td", strict=True))}


def sample_dims(in_shape: tuple[int, ...]) -> tuple[sp.Symbol, ...]:
    """The symbolic dims of a batch of samples of ``in_shape``, batch first: ``(N, F)`` for
    feature vectors, ``(N, T, D)`` for sequences, ``(N, C, H_in, W_in)`` for images."""
    if len(in_shape) == 1:
        return (N, F)
    if len(in_shape) == 2:
        return (N, *SEQ_DIMS)
    return (N, *IMAGE_DIMS[: len(in_shape)])


def register(cls: type[Layer]) -> type[Layer]:
    REGISTRY[cls.kind] = cls
    return cls


def _number(value: Any, *, field: str, positive: bool = False, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"must be a number, got {shown(value)}", field=field)
    if not abs(value) <= sys.float_info.max:  # nan, inf, or an integer beyond float64
        raise SpecError(f"must be a finite number, got {shown(value)}", field=field)
    if positive and not value > 0:
        raise SpecError(f"must be positive, got {value!r}", field=field)
    if minimum is not None and value < minimum:
        raise SpecError(f"must be at least {minimum}, got {value!r}", field=field)
    return float(value)


#: The most elements a size may give (a width, a channel count, a kernel's extent), a parameter
#: array may have, and a layer's output (or padded input) may have per sample; see Net.
MAX_ELEMENTS = 2**31


def shown(value: Any) -> str:
    """``repr(value)``, short for a huge integer (Python refuses to print one of 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _integer(value: Any, *, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"must be a positive integer, got {shown(value)}", field=field)
    if value > MAX_ELEMENTS:
        raise SpecError(f"must be at most 2**31 (symbp's limit on sizes), got {shown(value)}",
                        field=field)
    return value


def exact(value: float) -> sp.Expr:
    """A float hyper-parameter as an exact rational (``0.01`` -> ``1/100``)."""
    return sp.Rational(repr(float(value)))


@dataclass(frozen=True)
class AdjointClaim:
    """A claim that a layer's forward pass, without its bias (``linear``), is the adjoint of
    another layer's derived input gradient: ``linear(x) = dx of partner with dy := x``, so
    ``<linear(x), u> = <x, partner(u)>`` for the same parameters (a transposed convolution and
    conv2d). ``partner`` runs on ``partner_shape`` (the linear layer's output shape);
    ``renames`` maps the partner's size names to the layer's (its ``C`` is the layer's ``O``)."""

    linear: Layer
    partner: Layer
    partner_shape: tuple[int, ...]
    renames: dict[str, str] = field(default_factory=dict)
    statement: str = ""


class Layer:
    """A layer of a network. Subclasses set ``kind`` and define :meth:`forward_form`."""

    kind: ClassVar[str]
    #: what an initializer must do for each parameter: "fan", "normal" (N(0, 1)), "zeros",
    #: "ones" or a number
    init: ClassVar[dict[str, Any]] = {}
    #: reads the network's integer ids (an embedding): the first layer of a network whose
    #: input is ``ids``, told the ids' range by :meth:`bind_ids`
    takes_ids: ClassVar[bool] = False

    # What differs between layer types, declared here and read by the network plan
    # (symbp.derivation.plan) and every output target; nothing outside symbp.declare tests a kind.
    #: an activation (element-wise ``y = f(x)``): the notes list its derivative
    activation: ClassVar[bool] = False
    #: weights feeding this activation are drawn with He's gain (2 / fan_in, PyTorch's
    #: ``kaiming_normal_``) instead of Glorot's (2 / (fan_in + fan_out))
    he_gain_before: ClassVar[bool] = False
    #: an initializer looks through this layer for the activation after it (batch norm)
    init_looks_through: ClassVar[bool] = False
    #: arrays the training forward returns besides output and cache, for :meth:`state_updates`
    train_returns: ClassVar[tuple[str, ...]] = ()
    #: fewest values each training statistic averages (batch norm: 2, an unbiased variance),
    #: and what the error says when a batch has fewer
    min_values_per_statistic: ClassVar[int] = 1
    too_few_values: ClassVar[str] = ""
    #: the docstring of the generated state update (see :meth:`state_updates`)
    state_update_doc: ClassVar[str] = "Move the running state towards the batch's."
    #: each state array's initial value (:meth:`state_shapes`)
    state_initial: ClassVar[dict[str, float]] = {}
    #: the parameters weight decay covers by default (:mod:`.decay`): linear and conv weights
    decayed: ClassVar[tuple[str, ...]] = ()
    #: what the generated module's docstrings say this layer does in training and in evaluation
    #: mode, where the two differ (:meth:`eval_form`)
    training_doc: ClassVar[str] = ""
    evaluation_doc: ClassVar[str] = ""

    #: how many values the layer reads: a number, or None for two or more (concat); a layer
    #: reading several gets the tuple of their per-sample shapes as ``in_shape``
    arity: ClassVar[int | None] = 1
    #: the values this layer reads by name (earlier layers' outputs, the network's inputs);
    #: None: the previous layer's output (see :meth:`reads`, ``docs/graphs.md``)
    inputs: tuple[str, ...] | None = None
    #: the layer whose parameters this one uses (see :meth:`sharing`)
    share: str | None = None

    def __init__(self, *, name: str | None = None) -> None:
        self.name = None if name is None else check_identifier(name, what="layer name")

    # -- the graph ----------------------------------------------------------------------------
    def reads(self, *inputs: str) -> Layer:
        """This layer reads the values ``inputs`` (layer names, the network's input names, a
        split's part ``name.0``) instead of the previous layer's output; returns the layer.

        >>> import symbp
        >>> symbp.add().reads("fc1", "fc2").inputs
        ('fc1', 'fc2')
        """
        if len(inputs) == 1 and isinstance(inputs[0], list | tuple):
            inputs = tuple(inputs[0])
        if not inputs:
            raise SpecError("must name at least one value", field="inputs")
        for item in inputs:
            if not isinstance(item, str) or not item:
                raise SpecError(f"must be a list of value names, got {shown(item)}",
                                field="inputs")
        if len(set(inputs)) != len(inputs):
            raise SpecError(f"names a value twice ({', '.join(inputs)}); a layer reads each "
                            "value once", field="inputs")
        self.inputs = tuple(inputs)
        return self

    def sharing(self, owner: str) -> Layer:
        """This layer uses the parameters of the layer ``owner`` (same type, same parameter
        shapes): weight tying; returns the layer."""
        try:
            self.share = check_identifier(owner, what="layer name")
        except SpecError as err:
            raise SpecError(err.message, field="share") from None
        return self

    def parts(self, in_shape) -> list[Layer]:
        """Layers computing this one's several outputs, read as ``name.0``, ``name.1``, ...
        (a split); empty: one output, this layer's own."""
        return []

    def check_inputs(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        """Refuse inputs of shapes this layer cannot read (field ``inputs``); the default:
        all of one shape."""
        if len(set(shapes)) > 1:
            raise SpecError(
                f"{self.kind} reads values of one shape, got "
                + ", ".join(str(list(s)) for s in shapes),
                field="inputs",
            )

    def bind_ids(self, vocabulary: int) -> None:
        """The network's ids run over ``[0, vocabulary)`` (a layer that :attr:`takes_ids`)."""

    # -- shapes -------------------------------------------------------------------------------
    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def param_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {}

    # -- math ---------------------------------------------------------------------------------
    def forward_form(self, in_shape: tuple[int, ...]) -> Forward:
        raise NotImplementedError

    def eval_form(self, in_shape: tuple[int, ...]) -> Forward | None:
        """The evaluation-mode forward, where it differs from training (batchnorm, rrelu)."""
        return None

    def constant_values(self) -> dict[str, float]:
        """Values of the hyper-parameter symbols used in :meth:`forward_form`."""
        return {}

    def math_key(self, in_shape: tuple[int, ...]) -> tuple:
        """Layers with equal keys share one derivation (their sizes are symbolic)."""
        return (self.kind, len(in_shape))

    @property
    def function_stem(self) -> str:
        """The stem of the generated function names for this layer's math."""
        return self.kind

    def stem_for(self, in_shape: tuple[int, ...]) -> str:
        """:attr:`function_stem` for this layer on inputs of ``in_shape`` (a way of computing
        chosen at concrete sizes may add to it)."""
        return self.function_stem

    def describe(self) -> str:
        return self.kind

    def title(self, placed_name: str) -> str:
        """What the notes call this layer's math (a user activation: the layer's name)."""
        return self.kind

    # -- state and randomness ---------------------------------------------------------------
    def state_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Running state kept between training steps (batch norm's running statistics)."""
        return {}

    def state_updates(self) -> dict[str, sp.Expr]:
        """Each state array's new value (scalar form) from :attr:`train_returns` and ``N``."""
        return {}

    def statistics_over(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The axes (batch axis 0 included) that each training statistic averages over."""
        return ()

    def unrolled_cell(self, in_shape: tuple[int, ...]) -> Cell | None:
        """The :class:`Cell` (one time step) that this layer runs over the time axis of its
        ``(T, D)`` input, with shared weights (rnn, lstm); ``None``: not recurrent. The
        derivation is the cell's parts'; the generated layer functions loop over t around
        theirs."""
        return None

    def adjoint_of(self, in_shape: tuple[int, ...]) -> AdjointClaim | None:
        """What this layer's forward is the adjoint of, for ``symbp derive --verify`` to prove
        (:mod:`symbp.derivation.adjoint`) and the notes to state; ``None``: nothing claimed."""
        return None

    def draws(self) -> dict[str, tuple[str, tuple[float, ...]]]:
        """Auxiliary inputs drawn at random in training: name -> (``numpy.random.Generator``
        method, its arguments); rrelu: ``{"r": ("uniform", (lower, upper))}``."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass(frozen=True, eq=False)
class Cell:
    """One time step of a layer unrolled over time (:meth:`Layer.unrolled_cell`).

    ``states`` are the values a step hands to the next, each 0 before the first step; the first
    is the layer's output (rnn: ``("h",)``; lstm: ``("h", "c")``). ``parts`` compute a step, in
    order, each a layer with one output, the new value of one state (its last stage is named
    ``<state>_new``) and as inputs the step's input (its first input, ``x``), the states before
    the step (``h``, ``c``) and the new states of the parts before it (``c_new``); a part's
    backward is derived like any layer's. ``blocks`` maps a part's parameter that is a block of
    rows of one of the layer's parameters to ``(layer parameter, block, number of blocks)``
    (the LSTM's gates of PyTorch's stacked weights); any other part parameter is the layer's
    parameter of that name.
    """

    parts: tuple[Layer, ...]
    states: tuple[str, ...]
    blocks: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def part_state(self, part: Layer) -> str:
        """The state whose new value ``part`` computes."""
        name = part.forward_form().output.name
        state = name.removesuffix("_new")
        if state == name or state not in self.states:
            raise ValueError(f"{part.kind}'s output {name} is not a state's new value")
        return state

    def describe(self) -> str:
        return ", then ".join(p.describe() for p in self.parts)

