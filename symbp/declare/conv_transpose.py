"""The transposed convolution, as PyTorch's ``nn.ConvTranspose2d``.

Declared, like every layer, by its forward pass in index notation: each input pixel
``x[n, c, h, w]`` is scattered through the kernel to the output positions ``h*S + i``,
``w*S + j`` of a full-size map, which is then cropped by the padding::

    yf[n, o, u, v] = sum_{c,h,w,i,j} delta(u, h*S + i) delta(v, w*S + j) W[c, o, i, j] x[n, c, h, w]
    y[n, o, p, q]  = yf[n, o, p + P, q + P] + b[o]

(outside an array an element is 0, so ``output_padding`` extra rows and columns get the bias
alone). This is the formula :mod:`symbp.derivation` derives for conv2d's input gradient with
``dy := x``: the forward is the adjoint of conv2d's input gradient, which ``symbp derive
--verify`` proves at small sizes (:mod:`symbp.derivation.adjoint`). Its derived input gradient
is a strided convolution of ``dy`` with ``W``; nothing of it is written here.
"""

from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from .base import MAX_ELEMENTS, AdjointClaim, Layer, _integer, register, shown
from .conv import WINDOW_DIMS, Conv2d, _image, _pair
from .forms import Array, Forward, N, Stage, index, size

C, H, W = size("C"), size("H_in"), size("W_in")
CO, KH, KW = size("O"), size("K_h"), size("K_w")
HO, WO = size("H_out"), size("W_out")
STRIDE = sp.Symbol("stride", integer=True, positive=True)
PADDING = sp.Symbol("padding", integer=True, positive=True)
OUTPUT_PADDING = sp.Symbol("output_padding", integer=True, positive=True)
LETTERS = {N: "n", C: "c", H: "h", W: "w", CO: "o", KH: "i", KW: "j", HO: "p", WO: "q"}


def transposed_size(length: int, kernel: int, stride: int, padding: int,
                    output_padding: int) -> int:
    """PyTorch's output size: (L - 1)*S - 2P + K + output_padding."""
    return (length - 1) * stride - 2 * padding + kernel + output_padding


def _non_negative(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"must be a non-negative integer, got {shown(value)}", field=field)
    if value > MAX_ELEMENTS:
        raise SpecError(f"must be at most 2**31 (symbp's limit on sizes), got {shown(value)}",
                        field=field)
    return value


@register
class ConvTranspose2d(Layer):
    """2-D transposed convolution, as PyTorch's ConvTranspose2d: ``W`` (in, out, kh, kw),
    ``b`` (out,); output size ``(H - 1)*stride - 2*padding + kernel + output_padding``."""

    kind = "conv_transpose2d"
    init = {"W": "fan", "b": "zeros"}  # fan_in = out*kh*kw, as PyTorch counts this layout
    decayed = ("W",)  # weight decay covers the kernel by default, as conv2d's

    def __init__(
        self,
        out_channels: int,
        kernel,
        *,
        stride: int = 1,
        padding: int = 0,
        output_padding: int = 0,
        bias: bool = True,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.out_channels = _integer(out_channels, field="out_channels")
        self.kernel = _pair(kernel, "kernel")
        self.stride = _integer(stride, field="stride")
        self.padding = _non_negative(padding, "padding")
        self.output_padding = _non_negative(output_padding, "output_padding")
        if self.output_padding >= self.stride:
            raise SpecError(f"must be smaller than the stride {self.stride} (as PyTorch), got "
                            f"{self.output_padding}", field="output_padding")
        if not isinstance(bias, bool):
            raise SpecError(f"must be true or false, got {bias!r}", field="bias")
        self.bias = bias

    def output_shape(self, in_shape):
        _, height, width = _image(in_shape, self.kind)
        out = []
        for length, kernel in ((height, self.kernel[0]), (width, self.kernel[1])):
            full = transposed_size(length, kernel, self.stride, 0, self.output_padding)
            if full - 2 * self.padding < 1:
                raise SpecError(f"must be less than half the output before cropping, {full}, "
                                f"got {self.padding}", field="padding")
            out.append(full - 2 * self.padding)
        return (self.out_channels, *out)

    def param_shapes(self, in_shape):
        shapes = {"W": (in_shape[0], self.out_channels, *self.kernel)}
        if self.bias:
            shapes["b"] = (self.out_channels,)
        return shapes

    def constant_values(self):
        values = {}
        if self.stride != 1:
            values["stride"] = self.stride
        if self.padding:
            values["padding"] = self.padding
        if self.output_padding:
            values["output_padding"] = self.output_padding
        return values

    def _symbols(self):
        """stride, padding and output_padding as written in the formulas (1 and 0 inline)."""
        return (STRIDE if self.stride != 1 else sp.Integer(1),
                PADDING if self.padding else sp.Integer(0),
                OUTPUT_PADDING if self.output_padding else sp.Integer(0))

    def forward_form(self, in_shape):
        _image(in_shape, self.kind)
        stride, padding, output_padding = self._symbols()
        x, weight, bias = Array("x", (N, C, H, W)), Array("W", (C, CO, KH, KW)), Array("b", (CO,))
        n, o, c, h, w, i, j = (index(s) for s in "nochwij")
        # The output before cropping: (H - 1)*S + K + output_padding rows, the last
        # output_padding of them reached by no input pixel.
        full = (HO + 2 * padding, WO + 2 * padding)
        letters = dict(LETTERS)
        stages = []
        scattered = sp.Sum(
            sp.KroneckerDelta(index("u"), h * stride + i)
            * sp.KroneckerDelta(index("v"), w * stride + j)
            * weight[c, o, i, j] * x[n, c, h, w],
            (c, 0, C - 1), (h, 0, H - 1), (w, 0, W - 1), (i, 0, KH - 1), (j, 0, KW - 1))
        if self.padding:
            yf = Array("yf", (N, CO, *full))
            letters.update({full[0]: "u", full[1]: "v"})
            stages.append(Stage(yf, (n, o, index("u"), index("v")), scattered))
            p, q = index("p"), index("q")
            y = yf[n, o, p + padding, q + padding]
        else:
            p, q = index("u"), index("v")
            letters.update({HO: "u", WO: "v"})
            y = scattered
        if self.bias:
            y = y + bias[o]
        stages.append(Stage(Array("y", (N, CO, HO, WO)), (n, o, p, q), y))
        rules = {HO: (H - 1) * stride - 2 * padding + KH + output_padding,
                 WO: (W - 1) * stride - 2 * padding + KW + output_padding}
        constants = {STRIDE: self.stride, PADDING: self.padding,
                     OUTPUT_PADDING: self.output_padding}
        return Forward(
            inputs=(x,),
            params=(weight, bias) if self.bias else (weight,),
            stages=tuple(stages),
            keep=(),
            letters=letters,
            constants={k: sp.Integer(v) for k, v in constants.items()
                       if k in rules[HO].free_symbols},
            size_rules=rules,
            window_dims=WINDOW_DIMS,
        )

    def adjoint_of(self, in_shape):
        """The forward without its bias is conv2d's input gradient with ``dy := x``: conv2d
        with the same kernel, stride and padding, from ``out_channels`` to ``C`` channels, on
        this layer's output shape (whose output is then this layer's input shape, since
        ``output_padding < stride``), with the same ``W``, (C, O, K_h, K_w) read as conv2d's
        (out, in, kh, kw)."""
        linear = ConvTranspose2d(self.out_channels, list(self.kernel), stride=self.stride,
                                 padding=self.padding, output_padding=self.output_padding,
                                 bias=False)
        partner = Conv2d(in_shape[0], list(self.kernel), stride=self.stride,
                         padding=self.padding, bias=False)
        return AdjointClaim(
            linear=linear, partner=partner, partner_shape=self.output_shape(in_shape),
            renames={"C": "O", "O": "C", "H_in": "H_out", "W_in": "W_out", "H_out": "H_in",
                     "W_out": "W_in"},
            statement="conv2d's input gradient",
        )

    def math_key(self, in_shape):
        return (self.kind, self.bias, self.stride != 1, bool(self.padding),
                bool(self.output_padding))

    @property
    def function_stem(self):
        parts = [self.kind, "padded" if self.padding else "",
                 "strided" if self.stride != 1 else "",
                 "outpadded" if self.output_padding else "", "" if self.bias else "nobias"]
        return "_".join(part for part in parts if part)

    def describe(self):
        text = (f"{self.kind}(out_channels={self.out_channels}, kernel={list(self.kernel)}, "
                f"stride={self.stride}")
        if self.padding:
            text += f", padding={self.padding}"
        if self.output_padding:
            text += f", output_padding={self.output_padding}"
        return text + ")"
