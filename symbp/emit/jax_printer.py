"""Print whole-array sympy expressions as JAX (``jax.numpy``) code.

:class:`SymbpJaxPrinter` derives from the NumPy printer
(:class:`~symbp.emit.numpy_printer.SymbpNumPyPrinter`): the same lowered expressions, the same
choices of form, printed with ``jnp.`` in place of ``np.``. JAX arrays are immutable, so nothing
is printed in place: no ``out=``, NumPy's memory helpers (``_along_rows``, ``_row_vector``) become
the plain operations they compute, and a scatter-add is ``.at[ids].add(rows)``. The functions
NumPy lacks are JAX's own (``jax.nn.sigmoid``, ``jax.nn.softplus``, ``jax.scipy.special.erf``).

The generated module copies the few helpers printed code calls from :data:`HELPER_SOURCES`.
A product over sliding windows that is a convolution's output or one of its gradients (read
off the contraction's axes, as the torch target's helpers do) runs as
``jax.lax.conv_general_dilated``, XLA's convolution, in float32; any other, and any in
float64, as ``jnp.tensordot`` over the windows (im2col). Both compute the derived formula, not
a gradient typed here.
An array operation this printer does not print (one NumPy prints with a helper it lacks) raises
:class:`JaxPrintError` naming it.
"""

from __future__ import annotations

from sympy.printing.precedence import PRECEDENCE

from .numpy_printer import SymbpNumPyPrinter

#: Helper functions the printed code may call (copied into the module when used, with the
#: helpers they call: :data:`HELPER_NEEDS`). Array kernels only, the counterparts of
#: :mod:`symbp.runtime`'s: windows read, added back where they were read, zero padding,
#: window maxima; no gradient formula (those are printed from the derivation). A
#: scatter-add of rows is ``.at[ids].add``.
HELPER_SOURCES = {
    "_scatter_rows": '''def _scatter_rows(rows, ids, count):
    """The (count, ...) array whose row v is the sum of the rows of ``rows`` at id v."""
    zeros = jnp.zeros((count, *rows.shape[ids.ndim:]), rows.dtype)
    return zeros.at[ids].add(rows)
''',
    "_windows": '''def _windows(x, kernel, stride, dilation):
    """windows[..., p, q, i, j] = x[..., p*stride + i*dilation, q*stride + j*dilation]."""
    rows = (x.shape[-2] - dilation * (kernel[0] - 1) - 1) // stride + 1
    columns = (x.shape[-1] - dilation * (kernel[1] - 1) - 1) // stride + 1
    return jnp.stack([
        jnp.stack([
            x[..., i * dilation:i * dilation + (rows - 1) * stride + 1:stride,
              j * dilation:j * dilation + (columns - 1) * stride + 1:stride]
            for j in range(kernel[1])
        ], axis=-1)
        for i in range(kernel[0])
    ], axis=-2)
''',
    "_padded_conv": '''\
def _padded_conv(x, w, stride, dilation, dimension_numbers):
    """jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID", rhs_dilation=(dilation,
    dilation), dimension_numbers=...) computed with one more window before the first, read
    from a row and a column of zeros, then dropped: the same windows, and the padded form is
    the one XLA's CPU convolution runs fast (on jax 0.10, about half the time of VALID in
    float32; and zeros spread by the convolution's own padding are ten times slower in
    float64 than spread by jax.lax.pad first)."""
    out = jax.lax.conv_general_dilated(x, w, (stride, stride), [(stride, 0), (stride, 0)],
                                       rhs_dilation=(dilation, dilation),
                                       dimension_numbers=dimension_numbers)
    return out[:, :, 1:, 1:]
''',
    "_window_conv": '''\
def _window_conv(a, x, kernel, stride, dilation, axes_a, axes_windows):
    """jnp.tensordot(a, _windows(x, ...)) by jax.lax.conv_general_dilated where it is one of a
    batch x[n, c, h, w] (windows axes n, c, p, q, i, j): a[o, c, i, j] summed with the windows
    over c, i, j (out[o, n, p, q], a convolution's output) or a[n, o, p, q] summed with them
    over n, p, q (out[o, c, i, j], its weight gradient: x's channels as the batch, its batch
    as the features); None for any other contraction. Decided from the shapes while
    tracing."""
    if a.ndim != 4 or x.ndim != 4 or len(axes_a) != 3 or len(axes_windows) != 3:
        return None
    axes_a = [k % 4 for k in axes_a]
    pairs = dict(zip((k % 6 for k in axes_windows), axes_a, strict=True))
    free = [k for k in range(4) if k not in axes_a]
    if len(pairs) != 3 or len(free) != 1:
        return None
    count = [(s - (k - 1) * dilation - 1) // stride + 1
             for s, k in zip(x.shape[2:], kernel, strict=True)]
    if set(pairs) == {1, 4, 5}:
        weight = a.transpose(free[0], pairs[1], pairs[4], pairs[5])
        if weight.shape[2:] != tuple(kernel):
            return None
        # one more window before the first, read from a zero row and column, then dropped
        # (_padded_conv)
        return _padded_conv(x, weight, stride, dilation, ("NCHW", "OIHW", "CNHW"))
    if set(pairs) == {0, 2, 3}:
        grad = a.transpose(pairs[0], free[0], pairs[2], pairs[3])
        if list(grad.shape[2:]) != count:
            return None
        read = [(n - 1) * stride + (k - 1) * dilation + 1
                for n, k in zip(count, kernel, strict=True)]
        return _padded_conv(x[:, :, :read[0], :read[1]], grad, dilation, stride,
                            ("CNHW", "IOHW", "CNHW"))
    return None
''',
    "_window_tensordot": (
        '''def _window_tensordot(a, x, kernel, stride, dilation, axes_a, axes_windows):
    """jnp.tensordot(a, windows, (axes_a, axes_windows)) over the sliding windows of x (see
    _windows), by a convolution where the contraction is one (_window_conv), in float32: in
    float64 XLA's CPU convolutions are no faster than im2col, and for some shapes several
    times slower (jax 0.10)."""
    if x.dtype != jnp.float64:
        out = _window_conv(a, x, kernel, stride, dilation, axes_a, axes_windows)
        if out is not None:
            return out
    windows = _windows(x, kernel, stride, dilation)
    return jnp.tensordot(a, windows, axes=(list(axes_a), list(axes_windows)))
'''
    ),
    "_col2im": '''def _col2im(cols, kernel, stride, dilation):
    """Window entries added back where they were read (the adjoint of reading windows):
    out[..., p*stride + i*dilation, q*stride + j*dilation] += cols[..., p, q, i, j], each
    kernel offset's entries spread by zero padding (no scatter)."""
    *lead, rows, columns = cols.shape[:-2]
    cols = jnp.broadcast_to(cols, (*cols.shape[:-2], *kernel))
    if dilation == 1 and kernel[0] == kernel[1] == stride:  # windows tiling the input
        tiles = jnp.moveaxis(cols, -2, -3)  # (..., p, i, q, j)
        return tiles.reshape(*lead, rows * stride, columns * stride)
    height = (rows - 1) * stride + (kernel[0] - 1) * dilation + 1
    width = (columns - 1) * stride + (kernel[1] - 1) * dilation + 1
    zero, out = jnp.zeros((), cols.dtype), 0
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilation, j * dilation
            padding = [(0, 0, 0)] * len(lead) + [
                (top, height - top - (rows - 1) * stride - 1, stride - 1),
                (left, width - left - (columns - 1) * stride - 1, stride - 1),
            ]
            out = out + jax.lax.pad(cols[..., i, j], zero, padding)
    return out
''',
    "_col2im_conv": '''\
def _col2im_conv(a, b, axes_a, axes_b, order, kernel, stride, dilation):
    """_col2im(jnp.tensordot(a, b).transpose(order), ...) by jax.lax.conv_general_dilated where
    it is a convolution's input gradient: g[n, o, p, q] and w[o, c, i, j] (either operand, any
    axis order) summed over o into cols[n, c, p, q, i, j], added back where each window read:
    the full correlation of g, spread by the stride, with w flipped; None for any other
    contraction. Decided from the shapes while tracing."""
    if a.ndim != 4 or b.ndim != 4 or len(axes_a) != 1 or len(axes_b) != 1 or len(order) != 6:
        return None
    operands = (a, b)
    contracted = (axes_a[0] % 4, axes_b[0] % 4)
    sources = [(side, k) for side in (0, 1) for k in range(4) if k != contracted[side]]
    roles = [sources[k] for k in order]
    g_side, w_side = roles[0][0], roles[1][0]
    if ({roles[k][0] for k in (0, 2, 3)} != {g_side}
            or {roles[k][0] for k in (1, 4, 5)} != {w_side} or g_side == w_side):
        return None
    grad = operands[g_side].transpose(roles[0][1], contracted[g_side], roles[2][1], roles[3][1])
    weight = operands[w_side].transpose(contracted[w_side], roles[1][1], roles[4][1],
                                        roles[5][1])
    if weight.shape[2:] != tuple(kernel):
        return None
    spread = jax.lax.pad(grad, jnp.zeros((), grad.dtype), [(0, 0, 0), (0, 0, 0)] + [
        ((k - 1) * dilation, (k - 1) * dilation, stride - 1) for k in kernel])
    return _padded_conv(spread, jnp.flip(weight, (2, 3)), 1, dilation, ("NCHW", "IOHW", "NCHW"))
''',
    "_col2im_tensordot": (
        '''def _col2im_tensordot(a, b, axes_a, axes_b, order, kernel, stride, dilation):
    """_col2im(jnp.tensordot(a, b, (axes_a, axes_b)).transpose(order), kernel, ...), by a
    convolution where it is one (_col2im_conv), in float32 (see _window_tensordot)."""
    if a.dtype != jnp.float64:
        out = _col2im_conv(a, b, axes_a, axes_b, order, kernel, stride, dilation)
        if out is not None:
            return out
    cols = jnp.tensordot(a, b, axes=(list(axes_a), list(axes_b))).transpose(order)
    return _col2im(cols, kernel, stride, dilation)
'''
    ),
    "_shifted": '''def _shifted(a, offsets, sizes):
    """out[..., u, v] = a[..., u + offset_u, v + offset_v] over the last axes; 0 outside a."""
    lead = a.ndim - len(offsets)
    padding = [(0, 0, 0)] * lead + [
        (-o, s - n + o, 0) for o, s, n in zip(offsets, sizes, a.shape[lead:], strict=True)
    ]
    return jax.lax.pad(a, jnp.zeros((), a.dtype), padding)
''',
    "_window_max": '''def _window_max(windows):
    """The maximum of each window (last two axes)."""
    return windows.max(axis=(-2, -1))
''',
    "_first_argmax": '''def _first_argmax(windows, top=None):
    """The row-major position i*K_w + j of each window's first maximum (last two axes)."""
    return windows.reshape(*windows.shape[:-2], -1).argmax(axis=-1)
''',
    "_first_argmax_mask": '''def _first_argmax_mask(windows):
    """1 at the first maximum of each window (last two axes, row-major order), 0 elsewhere."""
    positions = jnp.arange(windows.shape[-2] * windows.shape[-1]).reshape(windows.shape[-2:])
    return (positions == _first_argmax(windows)[..., None, None]).astype(windows.dtype)
''',
    "_argmax_col2im": '''def _argmax_col2im(argmax, g, kernel, stride, dilation):
    """Each window's g added where its arg-max (row-major kernel offset) was read."""
    positions = jnp.arange(kernel[0] * kernel[1]).reshape(kernel)
    mask = positions == argmax[..., None, None]
    return _col2im(jnp.where(mask, g, jnp.zeros((), g.dtype)), kernel, stride, dilation)
''',
    "_first_max_col2im": '''def _first_max_col2im(windows, g, kernel, stride, dilation):
    """Each window's g added where the window's first maximum was read."""
    return _col2im(_first_argmax_mask(windows) * g, kernel, stride, dilation)
''',
}

#: The helpers each helper calls.
HELPER_NEEDS = {
    "_window_tensordot": ("_windows", "_window_conv", "_padded_conv"),
    "_col2im_tensordot": ("_col2im", "_col2im_conv", "_padded_conv"),
    "_first_argmax_mask": ("_first_argmax",),
    "_argmax_col2im": ("_col2im",),
    "_first_max_col2im": ("_col2im", "_first_argmax_mask", "_first_argmax"),
}

#: NumPy printer helper -> what this printer prints instead (a JAX function or a helper above)
_FUNCTIONS = {
    "sigmoid": "jax.nn.sigmoid",
    "softplus": "jax.nn.softplus",
    "erf": "jax.scipy.special.erf",
    "erfc": "jax.scipy.special.erfc",
    **{name[1:]: name for name in HELPER_SOURCES},
}


def helper_sources(names) -> list[str]:
    """The sources of the helpers ``names`` and of those they call, in a fixed order."""
    needed = set(names)
    for name in list(needed):
        needed |= set(HELPER_NEEDS.get(name, ()))
    return [source for name, source in HELPER_SOURCES.items() if name in needed]


class JaxPrintError(ValueError):
    """An expression uses an array operation the JAX printer does not print yet."""


class SymbpJaxPrinter(SymbpNumPyPrinter):
    """``jax.numpy`` code for array expressions, with ``jnp`` as the module name."""

    printmethod = "_symbp_jaxcode"

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        return "jnp." + text[len("np."):] if text.startswith("np.") else text

    def _helper(self, key: str) -> str:
        name = _FUNCTIONS.get(key)
        if name is None:
            raise JaxPrintError(f"the jax target cannot print {key.replace('_', ' ')} yet")
        if name in HELPER_SOURCES:
            self.helpers_used.add(name)
        return name

    # -- what NumPy computes in place, computed as new arrays -----------------------------------
    def row_pass(self, ufunc, first, second, out=None):
        operator = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}[ufunc]
        level = PRECEDENCE["Mul"] if ufunc in ("multiply", "divide") else PRECEDENCE["Add"]
        return (
            f"{self.parenthesize(first, level)} {operator} "
            f"{self.parenthesize(second, level + 1)}"
        )

    def _reduction(self, expr, method):
        array, axes = expr.args
        axes = tuple(int(a) for a in axes)
        axis = str(axes[0]) if len(axes) == 1 else str(axes)
        text = self.parenthesize(array, PRECEDENCE["Atom"], strict=True)
        return f"{text}.{method}(axis={axis})"

    def _print_RowVector(self, expr):
        return self._print(expr.args[0])

    def _fused_sum(self, expr):
        # sum(a*b) as jnp.einsum (as NumPy's); a plain sum over the first axis stays a sum
        # (NumPy's product with ones is a BLAS detour that XLA does not need)
        fused = super()._fused_sum(expr)
        if fused is None or "jnp.ones(" in fused:
            return None
        return fused

    def _print_Positions(self, expr):
        return f"jnp.arange({self._print(expr.args[0])})"

    def _print_Einsum(self, expr):
        spec, *operands = expr.args
        arguments = ", ".join(self._print(o) for o in operands)
        return f'jnp.einsum("{spec}", {arguments})'

    def _print_TensorDot(self, expr):
        a, b, axes_a, axes_b, order = expr.args
        text = (
            f"jnp.tensordot({self._print(a)}, {self._print(b)}, "
            f"axes=({list(int(k) for k in axes_a)}, {list(int(k) for k in axes_b)}))"
        )
        return text + self._transposed(order)

    def _print_Windows(self, expr):
        array, kernel, stride, dilation = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        return (
            f"{self._helper('windows')}({self._print(array)}, {kernel_text}, "
            f"{self._print(stride)}, {self._print(dilation)})"
        )
