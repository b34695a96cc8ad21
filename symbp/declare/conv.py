"""Layers for images (NCHW, batch first): conv2d, max/avg pooling, flatten.

Like every layer, each declares only its forward pass in index notation. Two conventions make
these definitions short and exact:

* an array element whose index falls outside the array's range is 0 (so zero padding is the
  stage ``xp[n, c, u, v] = x[n, c, u - P, v - P]``), and
* a window is read with a compound index: ``xp[n, c, p*S + i*D, q*S + j*D]`` for output position
  ``(p, q)``, kernel offset ``(i, j)``, stride ``S`` and dilation ``D``.

Shapes are per sample: ``(C, H, W)``. Batch norm on such inputs normalizes per channel over
``(N, H, W)`` (PyTorch's BatchNorm2d); it lives in :mod:`.layers`.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import SEQ_DIMS, sample_dims
from .forms import Array, Forward, N, Stage, WindowMax, index, size
from .layers import MAX_ELEMENTS, Layer, _integer, register, shown

C, H, W = size("C"), size("H_in"), size("W_in")
CO, KH, KW = size("O"), size("K_h"), size("K_w")
HO, WO = size("H_out"), size("W_out")
STRIDE = sp.Symbol("stride", integer=True, positive=True)
PADDING = sp.Symbol("padding", integer=True, positive=True)
DILATION = sp.Symbol("dilation", integer=True, positive=True)
LETTERS = {N: "n", C: "c", H: "h", W: "w", CO: "o", KH: "i", KW: "j", HO: "p", WO: "q"}
SEQ_LETTERS = dict(zip(SEQ_DIMS, "td", strict=True))
#: sizes that are window lengths (a compound index's kernel part runs over them)
WINDOW_DIMS = frozenset({KH, KW})
#: how the output size follows from the others (for checks at concrete sizes)
SIZE_RULES = {
    HO: sp.floor((H + 2 * PADDING - DILATION * (KH - 1) - 1) / STRIDE) + 1,
    WO: sp.floor((W + 2 * PADDING - DILATION * (KW - 1) - 1) / STRIDE) + 1,
}


def _pair(value, field: str) -> tuple[int, int]:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise SpecError(f"must be one integer or two, got {value!r}", field=field)
        return (_integer(value[0], field=field), _integer(value[1], field=field))
    number = _integer(value, field=field)
    return (number, number)


def _image(in_shape, kind: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise SpecError(f"{kind} expects images (C, H, W), got per-sample shape {list(in_shape)}")
    return in_shape


def output_size(length: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """PyTorch's output size: floor((L + 2P - D*(K - 1) - 1) / S) + 1."""
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _Windowed(Layer):
    """Shared by layers that read windows: kernel, stride, padding, dilation."""

    def _window_init(self, kernel, stride, padding, dilation):
        self.kernel = _pair(kernel, "kernel")
        self.stride = _pair(stride if stride is not None else self.kernel, "stride")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise SpecError(f"must be a non-negative integer, got {shown(padding)}",
                            field="padding")
        if padding > MAX_ELEMENTS:
            raise SpecError(f"must be at most 2**31 (symbp's limit on sizes), got "
                            f"{shown(padding)}", field="padding")
        self.padding = padding
        self.dilation = _pair(dilation, "dilation")
        if stride is None and len(set(self.stride)) != 1:
            raise SpecError(
                f"a rectangular kernel {list(self.kernel)} needs a stride, one integer for both "
                "axes (the default, the kernel, differs per axis, which is not supported)",
                field="stride",
            )
        if len(set(self.stride)) != 1 or len(set(self.dilation)) != 1:
            raise SpecError("different strides or dilations per axis are not supported",
                            field="stride")

    def output_shape(self, in_shape):
        channels, height, width = _image(in_shape, self.kind)
        out = []
        for length, kernel, axis in ((height, self.kernel[0], "height"),
                                     (width, self.kernel[1], "width")):
            effective = self.dilation[0] * (kernel - 1) + 1
            if effective > length + 2 * self.padding:
                reach = f" (dilated {effective})" if self.dilation[0] != 1 else ""
                raise SpecError(
                    f"kernel {kernel}{reach} is larger than the padded input "
                    f"{axis} {length + 2 * self.padding}",
                    field="kernel",
                )
            out.append(output_size(length, kernel, self.stride[0], self.padding, self.dilation[0]))
        return (self._out_channels(channels), *out)

    def _out_channels(self, channels: int) -> int:
        return channels

    def constant_values(self):
        # A stride or dilation of 1 is written into the formulas (p + i, not p*stride + i).
        values = {}
        if self.stride[0] != 1:
            values["stride"] = self.stride[0]
        if self.dilation[0] != 1:
            values["dilation"] = self.dilation[0]
        if self.padding:
            values["padding"] = self.padding
        return values

    def _step(self, symbol, value: int):
        return symbol if value != 1 else sp.Integer(1)

    def _size_rules(self) -> dict:
        fixed = {PADDING: PADDING if self.padding else 0,
                 STRIDE: self._step(STRIDE, self.stride[0]),
                 DILATION: self._step(DILATION, self.dilation[0])}
        return {k: v.xreplace(fixed) for k, v in SIZE_RULES.items()}

    def _constants(self) -> dict:
        values = {"stride": STRIDE, "dilation": DILATION, "padding": PADDING}
        return {values[k]: sp.Integer(v) for k, v in self.constant_values().items()
                if k in values}

    def _padded(self, x: Array) -> tuple[Array, list[Stage]]:
        """The zero-padded input as a stage (none without padding)."""
        if not self.padding:
            return x, []
        n, c, u, v = index("n"), index("c"), index("u"), index("v")
        xp = Array("xp", (N, C, H + 2 * PADDING, W + 2 * PADDING))
        return xp, [Stage(xp, (n, c, u, v), x[n, c, u - PADDING, v - PADDING])]

    def _window(self, xp: Array, channel):
        p, q, i, j = index("p"), index("q"), index("i"), index("j")
        stride = self._step(STRIDE, self.stride[0])
        dilation = self._step(DILATION, self.dilation[0])
        return xp[index("n"), channel, p * stride + i * dilation, q * stride + j * dilation]

    def _letters(self):
        letters = dict(LETTERS)
        letters[H + 2 * PADDING] = "u"
        letters[W + 2 * PADDING] = "v"
        return letters

    def math_key(self, in_shape):
        return (self.kind, bool(self.padding), self.stride[0] != 1, self.dilation[0] != 1)

    @property
    def function_stem(self):
        parts = [self.kind, "padded" if self.padding else "", "strided" if self.stride[0] != 1
                 else "", "dilated" if self.dilation[0] != 1 else ""]
        return "_".join(part for part in parts if part)

    def describe(self):
        text = f"{self.kind}(kernel={list(self.kernel)}, stride={self.stride[0]}"
        if self.padding:
            text += f", padding={self.padding}"
        if self.dilation[0] != 1:
            text += f", dilation={self.dilation[0]}"
        return text + ")"


@register
class Conv2d(_Windowed):
    """2-D cross-correlation, as PyTorch's Conv2d: ``W`` (out, in, kh, kw), ``b`` (out,)."""

    kind = "conv2d"
    init = {"W": "fan", "b": "zeros"}
    decayed = ("W",)

    def __init__(
        self,
        out_channels: int,
        kernel,
        *,
        stride=1,
        padding: int = 0,
        dilation=1,
        bias: bool = True,
        in_channels: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.out_channels = _integer(out_channels, field="out_channels")
        self.in_channels = (
            None if in_channels is None else _integer(in_channels, field="in_channels")
        )
        if not isinstance(bias, bool):
            raise SpecError(f"must be true or false, got {bias!r}", field="bias")
        self.bias = bias
        self._window_init(kernel, stride, padding, dilation)

    def output_shape(self, in_shape):
        shape = super().output_shape(in_shape)
        if self.in_channels is not None and self.in_channels != in_shape[0]:
            raise SpecError(
                f"declares {self.in_channels} input channels but receives {in_shape[0]}",
                field="in_channels",
            )
        return shape

    def _out_channels(self, channels):
        return self.out_channels

    def param_shapes(self, in_shape):
        shapes = {"W": (self.out_channels, in_shape[0], *self.kernel)}
        if self.bias:
            shapes["b"] = (self.out_channels,)
        return shapes

    def forward_form(self, in_shape):
        _image(in_shape, self.kind)
        x, weight, bias = Array("x", (N, C, H, W)), Array("W", (CO, C, KH, KW)), Array("b", (CO,))
        xp, stages = self._padded(x)
        n, o, p, q, c, i, j = (index(s) for s in "nopqcij")
        y = sp.Sum(weight[o, c, i, j] * self._window(xp, c), (c, 0, C - 1), (i, 0, KH - 1),
                   (j, 0, KW - 1))
        if self.bias:
            y = y + bias[o]
        stages.append(Stage(Array("y", (N, CO, HO, WO)), (n, o, p, q), y))
        return Forward(
            gather=self.gathers_input_grad(in_shape),
            inputs=(x,),
            params=(weight, bias) if self.bias else (weight,),
            stages=tuple(stages),
            keep=(xp.name,),
            letters=self._letters(),
            constants=self._constants(),
            size_rules=self._size_rules(),
            window_dims=WINDOW_DIMS,
        )

    def gathers_input_grad(self, in_shape) -> bool:
        """Whether the input gradient is computed as a full convolution (a gather) rather than
        by scattering columns back (``_col2im``).

        Both are one matrix product of the same size. The gather reads windows of the padded
        upstream gradient, ``O*K_h*K_w`` rows per input pixel; the scatter writes
        ``C*K_h*K_w`` rows per output pixel and then adds them up offset by offset. With
        stride and dilation 1, the gather is taken when its windows are no bigger than the
        scatter's columns (a "same" convolution with as many outputs as inputs: VGG-style).
        """
        if self.stride[0] != 1 or self.dilation[0] != 1:
            return False
        channels, height, width = in_shape
        _, out_height, out_width = self.output_shape(in_shape)
        return self.out_channels * height * width <= channels * out_height * out_width

    def math_key(self, in_shape):
        return (*super().math_key(in_shape), self.bias, self.gathers_input_grad(in_shape))

    def stem_for(self, in_shape):
        return self.function_stem + ("_gather" if self.gathers_input_grad(in_shape) else "")

    @property
    def function_stem(self):
        return super().function_stem + ("" if self.bias else "_nobias")

    def describe(self):
        return super().describe().replace("conv2d(", f"conv2d(out_channels={self.out_channels}, ")


class _Pool(_Windowed):
    def __init__(self, kernel, *, stride=None, padding: int = 0, name: str | None = None):
        super().__init__(name=name)
        self._window_init(kernel, stride, padding, 1)
        if any(padding > k // 2 for k in self.kernel):
            raise SpecError(
                f"must be at most half the kernel {list(self.kernel)} (as PyTorch: no window may "
                f"lie wholly in the padding), got {padding}",
                field="padding",
            )

    def constant_values(self):
        # The window size is a keyword of the generated functions (no kernel array carries it).
        return {"K_h": self.kernel[0], "K_w": self.kernel[1], **super().constant_values()}

    def _constants(self) -> dict:
        return {KH: sp.Integer(self.kernel[0]), KW: sp.Integer(self.kernel[1]),
                **super()._constants()}

    def _pool_form(self, in_shape, reduce) -> Forward:
        _image(in_shape, self.kind)
        x = Array("x", (N, C, H, W))
        xp, stages = self._padded(x)
        n, c, p, q = (index(s) for s in "ncpq")
        stages.append(Stage(Array("y", (N, C, HO, WO)), (n, c, p, q), reduce(self._window(xp, c))))
        return Forward(
            inputs=(x,),
            params=(),
            stages=tuple(stages),
            keep=(xp.name,) if reduce is _maximum else (),
            letters=self._letters(),
            constants=self._constants(),
            size_rules=self._size_rules(),
            window_dims=WINDOW_DIMS,
        )


def _average(element):
    i, j = index("i"), index("j")
    return sp.Sum(element, (i, 0, KH - 1), (j, 0, KW - 1)) / (KH * KW)


def _maximum(element):
    i, j = index("i"), index("j")
    return WindowMax(element, (i, 0, KH - 1), (j, 0, KW - 1))


@register
class MaxPool2d(_Pool):
    """Max over each window; the gradient goes to the window's (first) arg-max."""

    kind = "maxpool2d"

    def __init__(self, kernel, *, stride=None, name: str | None = None):
        # No padding: PyTorch pads max pooling with -inf, and outside an array symbp reads 0.
        super().__init__(kernel, stride=stride, padding=0, name=name)

    def forward_form(self, in_shape):
        return self._pool_form(in_shape, _maximum)


@register
class AvgPool2d(_Pool):
    """Mean over each window (zero padding counted, as PyTorch's default)."""

    kind = "avgpool2d"

    def forward_form(self, in_shape):
        return self._pool_form(in_shape, _average)


@register
class Flatten(Layer):
    """``(C, H, W)`` per sample to ``C*H*W`` features, in C order (NumPy's reshape)."""

    kind = "flatten"

    def output_shape(self, in_shape):
        total = 1
        for length in in_shape:
            total *= length
        return (total,)

    def forward_form(self, in_shape):
        # y[n, k] = x[n, c, h, w] where k = c*H*W + h*W + w (C order): a sum over the input's
        # entries picking the one whose flat position is k. The backward is derived from it
        # (dx[n, c, h, w] = dy[n, c*H*W + h*W + w]); a target that recognises the pair as a
        # reshape prints one (symbp.derivation.plan).
        letters = LETTERS
        if len(in_shape) == 2:  # a sequence (T, D)
            dims, letters = sample_dims(in_shape), {**LETTERS, **SEQ_LETTERS}
        else:
            dims = (N, C, H, W)[: len(in_shape) + 1]
        idx = tuple(index(letters[d]) for d in dims)
        x = Array("x", dims)
        flat, stride = sp.Integer(0), sp.Integer(1)
        for i, d in zip(reversed(idx[1:]), reversed(dims[1:]), strict=True):
            flat, stride = flat + i * stride, stride * d
        k = index("k")
        limits = [(i, 0, d - 1) for i, d in zip(idx[1:], dims[1:], strict=True)]
        picked = sp.Sum(x[idx] * sp.KroneckerDelta(k, flat), *limits)
        return Forward(
            inputs=(x,),
            params=(),
            stages=(Stage(Array("y", (N, stride)), (idx[0], k), picked),),
            keep=(),
            letters=letters,
        )

    def math_key(self, in_shape):
        return (self.kind, len(in_shape))
