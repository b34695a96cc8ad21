"""The helpers a generated torch module copies: the array operations of symbp's NumPy runtime
(:mod:`symbp.runtime`: windows and their adjoint, pooling's routing, rows scattered by id) in
torch, and a softplus without ``F.softplus``'s threshold (it returns x above 20, an error of
e**-20). Numerical building blocks, not gradient formulas: the derivation decides where each
is called. Each is the source text the module copies (:data:`HELPER_SOURCES`), with the
helpers it calls (:data:`HELPER_CALLS`).
"""

from __future__ import annotations

HELPER_SOURCES = {
    "_softplus": '''def _softplus(u):
    """log(1 + e**u) element-wise: max(u, 0) + log1p(e**-|u|) (nothing overflows)."""
    return torch.clamp(u, min=0) + torch.log1p(torch.exp(-torch.abs(u)))
''',
    "_windows": '''def _windows(x, kernel, stride, dilation):
    """The view windows[..., p, q, i, j] = x[..., p*stride + i*dilation, q*stride + j*dilation]."""
    rows, columns = ((k - 1) * dilation + 1 for k in kernel)
    view = x.unfold(-2, rows, stride).unfold(-2, columns, stride)
    return view if dilation == 1 else view[..., ::dilation, ::dilation]
''',
    "_col2im": '''def _col2im(cols, kernel, stride, dilation):
    """Scatter-add window entries back to where they were read (the adjoint of _windows):
    out[..., p*stride + i*dilation, q*stride + j*dilation] += cols[..., p, q, i, j], one
    strided slice of out per kernel offset (i, j)."""
    *lead, rows, columns = cols.shape[:-2]
    size = [(n - 1) * stride + (k - 1) * dilation + 1
            for n, k in zip((rows, columns), kernel, strict=True)]
    out = cols.new_zeros((*lead, *size))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            out[..., i * dilation:i * dilation + (rows - 1) * stride + 1:stride,
                j * dilation:j * dilation + (columns - 1) * stride + 1:stride] += cols[
                ..., min(i, cols.shape[-2] - 1), min(j, cols.shape[-1] - 1)]
    return out
''',
    "_shifted": '''def _shifted(a, offsets, sizes):
    """out[..., u, v] = a[..., u + offset_u, v + offset_v] over the last axes; 0 outside a."""
    lead = a.dim() - len(offsets)
    read, written = [...], [...]
    for o, s, n in zip(offsets, sizes, a.shape[lead:], strict=True):
        start = min(max(o, 0), n)
        stop = max(min(o + s, n), start)
        read.append(slice(start, stop))
        written.append(slice(start - o, stop - o))
    if all(w == slice(0, s) for w, s in zip(written[1:], sizes, strict=True)):
        return a[tuple(read)]
    out = a.new_zeros((*a.shape[:lead], *sizes))
    out[tuple(written)] = a[tuple(read)]
    return out
''',
    "_dot_sum": '''def _dot_sum(a, b, dims):
    """(a * b).sum(dim=dims) for a and b of one shape, the product made a block of rows at a
    time where the first axis is summed: each block's product stays in cache, and no array the
    size of a is allocated (batch norm's sums on (64, 64, 32, 32): 0.2-0.6x the time of the
    product summed whole, and of torch.einsum, which copies both into a batched product)."""
    dims = tuple(sorted(d % a.dim() for d in dims))
    if 0 not in dims or a.shape[0] == 0:
        return (a * b).sum(dim=dims)
    rows = max(1, (1 << 18) // max(1, a[0].numel()))
    out = None
    for part_a, part_b in zip(a.split(rows), b.split(rows), strict=True):
        part = (part_a * part_b).sum(dim=dims)
        out = part if out is None else out.add_(part)
    return out
''',
    "_window_conv": '''\
def _window_conv(a, x, kernel, stride, dilation, axes_a, axes_windows, bias=None):
    """torch.tensordot(a, _windows(x, ...)) by torch's convolution kernels where it is one of
    a batch x[n, c, h, w] (windows axes n, c, p, q, i, j): a[o, c, i, j] summed with the
    windows over c, i, j (out[o, n, p, q], conv2d's output; plus bias[o], given one) or
    a[n, o, p, q] summed with them over n, p, q (out[o, c, i, j], conv2d's weight gradient);
    None for any other contraction."""
    if a.dim() != 4 or x.dim() != 4 or len(axes_a) != 3 or len(axes_windows) != 3:
        return None
    axes_a = [k % 4 for k in axes_a]
    pairs = dict(zip((k % 6 for k in axes_windows), axes_a, strict=True))
    free = [k for k in range(4) if k not in axes_a]
    if len(pairs) != 3 or len(free) != 1:
        return None
    if set(pairs) == {1, 4, 5}:
        weight = a.permute(free[0], pairs[1], pairs[4], pairs[5])
        if tuple(weight.shape[2:]) != tuple(kernel):
            return None
        if stride == 1 and x.dtype == torch.float64 and x.device.type == "cpu" and (
                x.shape[1] >= 16):
            out = _conv2d_as_input_grad(x, weight, dilation)
            if bias is not None:
                out += bias[:, None, None]
        else:
            out = torch.nn.functional.conv2d(x, weight, bias, stride=stride, dilation=dilation)
        return out.permute(1, 0, 2, 3)
    if set(pairs) == {0, 2, 3} and bias is None:
        grad = a.permute(pairs[0], free[0], pairs[2], pairs[3])
        # conv2d's weight gradient (torch.nn.grad.conv2d_weight's kernel, given the weight's
        # shape by an empty tensor where that wrapper expands one)
        weight = x.new_empty((grad.shape[1], x.shape[1], *kernel))
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, [stride, stride], [0, 0], [dilation, dilation], False,
            [0, 0], 1, [False, True, False])[1]
    return None
''',
    "_conv2d_as_input_grad": '''\
def _conv2d_as_input_grad(x, weight, dilation):
    """conv2d(x, weight, dilation=dilation) (stride 1) by the kernel of a convolution's input
    gradient: the correlation of x with weight is the input gradient, for the upstream gradient
    x, of the convolution with weight flipped, its channel axes swapped, padded by the kernel's
    extent less one. The same sums; on the CPU in float64 (no oneDNN kernels) the input
    gradient's kernel took 0.15-0.7x conv2d's time for 16-64 input channels (issue 26)."""
    kernel = weight.shape[2:]
    size = [n - (k - 1) * dilation for n, k in zip(x.shape[2:], kernel, strict=True)]
    flipped = torch.flip(weight, (2, 3)).transpose(0, 1)
    padding = [(k - 1) * dilation for k in kernel]
    return torch.ops.aten.convolution_backward(
        x, x.new_empty((x.shape[0], weight.shape[0], *size)), flipped, None, [1, 1], padding,
        [dilation, dilation], False, [0, 0], 1, [True, False, False])[0]
''',
    "_window_tensordot": '''\
def _window_tensordot(a, x, kernel, stride, dilation, axes_a, axes_windows, bias=None):
    """torch.tensordot(a, windows) over the sliding windows of x (see _windows), by a
    convolution kernel where the contraction is one (_window_conv); given bias, a vector
    added along the product's first axis (a's one free axis: a convolution's bias, which
    conv2d adds in its own pass)."""
    out = _window_conv(a, x, kernel, stride, dilation, axes_a, axes_windows, bias)
    if out is not None:
        return out
    windows = _windows(x, kernel, stride, dilation)
    out = torch.tensordot(a, windows, dims=(list(axes_a), list(axes_windows)))
    if bias is not None:
        out += bias.reshape(-1, *[1] * (out.dim() - 1))
    return out
''',
    "_col2im_conv": '''\
def _col2im_conv(a, b, axes_a, axes_b, order, kernel, stride, dilation):
    """_col2im(torch.tensordot(a, b).permute(order), ...) by torch's convolution kernels where
    it is conv2d's input gradient: g[n, o, p, q] and w[o, c, i, j] (either operand, any axis
    order) summed over o into cols[n, c, p, q, i, j]; None for any other contraction."""
    if a.dim() != 4 or b.dim() != 4 or len(axes_a) != 1 or len(axes_b) != 1 or len(order) != 6:
        return None
    operands = (a, b)
    contracted = (axes_a[0] % 4, axes_b[0] % 4)
    sources = [(side, k) for side in (0, 1) for k in range(4) if k != contracted[side]]
    roles = [sources[k] for k in order]
    g_side, w_side = roles[0][0], roles[1][0]
    if ({roles[k][0] for k in (0, 2, 3)} != {g_side}
            or {roles[k][0] for k in (1, 4, 5)} != {w_side} or g_side == w_side):
        return None
    grad = operands[g_side].permute(roles[0][1], contracted[g_side], roles[2][1], roles[3][1])
    weight = operands[w_side].permute(contracted[w_side], roles[1][1], roles[4][1], roles[5][1])
    if tuple(weight.shape[2:]) != tuple(kernel):
        return None
    size = [(n - 1) * stride + (k - 1) * dilation + 1
            for n, k in zip(grad.shape[2:], kernel, strict=True)]
    # conv2d's input gradient (torch.nn.grad.conv2d_input's kernel, given the input's shape by
    # an empty tensor where that wrapper expands one: 0.8x its time on (64, 64, 34, 34))
    empty = grad.new_empty((grad.shape[0], weight.shape[1], *size))
    return torch.ops.aten.convolution_backward(
        grad, empty, weight, None, [stride, stride], [0, 0], [dilation, dilation], False, [0, 0],
        1, [True, False, False])[0]
''',
    "_col2im_tensordot": '''\
def _col2im_tensordot(a, b, axes_a, axes_b, order, kernel, stride, dilation):
    """_col2im(torch.tensordot(a, b).permute(order), kernel, stride, dilation), by a
    convolution kernel where it is one (_col2im_conv)."""
    out = _col2im_conv(a, b, axes_a, axes_b, order, kernel, stride, dilation)
    if out is not None:
        return out
    product = torch.tensordot(a, b, dims=(list(axes_a), list(axes_b))).permute(order)
    return _col2im(product, kernel, stride, dilation)
''',
    "_window_max": '''def _window_max(windows):
    """The maximum of each window (last two axes), NaN where the window holds one; one
    element-wise maximum per kernel offset for small windows."""
    if windows.shape[-2:].numel() > 16:
        return windows.amax(dim=(-2, -1))
    top = windows[..., 0, 0].clone()
    for k in range(1, windows.shape[-2:].numel()):
        torch.maximum(top, windows[..., k // windows.shape[-1], k % windows.shape[-1]], out=top)
    return top
''',
    "_first_argmax": '''def _first_argmax(windows, top=None):
    """The row-major position i*K_w + j of each window's first maximum (last two axes; the
    first NaN where it holds one), in uint8 where it fits; given top, the maxima (without NaN),
    counted as the offsets before the first that holds the maximum: a comparison with top and
    two passes over booleans an offset (0.5-0.6x the time of picking each hit's offset)."""
    small = windows.shape[-2:].numel() <= 256
    if top is None or not small or (top.is_floating_point() and top.isnan().any()):
        position = windows.flatten(-2).argmax(dim=-1)
        return position.to(torch.uint8) if small else position
    columns = windows.shape[-1]
    missed = windows[..., 0, 0] != top  # no offset up to k holds the maximum
    position = missed.to(torch.uint8)
    for k in range(1, windows.shape[-2:].numel() - 1):
        missed &= windows[..., k // columns, k % columns] != top
        position += missed
    return position
''',
    "_first_argmax_mask": '''def _first_argmax_mask(windows):
    """1 at the first maximum of each window (last two axes, row-major order), 0 elsewhere."""
    position = windows.flatten(-2).argmax(dim=-1, keepdim=True)
    mask = torch.zeros_like(windows.flatten(-2)).scatter_(-1, position, 1)
    return mask.reshape(windows.shape)
''',
    "_argmax_col2im": '''def _argmax_col2im(argmax, g, kernel, stride, dilation):
    """Each window's g added where the window's arg-max (its row-major kernel offset) was
    read, 0 elsewhere: _col2im of g times the arg-max's 0/1 mask, as one scatter-add of each
    window's g at the arg-max's flat position in the output."""
    position = argmax.long()
    if g.shape[-2:] == (1, 1):
        picked = g[..., 0, 0].expand(argmax.shape)
    else:
        picked = g.expand(*argmax.shape, *kernel).flatten(-2)
        picked = picked.gather(-1, position.unsqueeze(-1)).squeeze(-1)
    *lead, rows, columns = argmax.shape
    size = [(n - 1) * stride + (k - 1) * dilation + 1
            for n, k in zip((rows, columns), kernel, strict=True)]
    offsets = [i * dilation * size[1] + j * dilation
               for i in range(kernel[0]) for j in range(kernel[1])]
    start = torch.arange(0, rows * stride, stride, device=argmax.device)[:, None] * size[1]
    start = start + torch.arange(0, columns * stride, stride, device=argmax.device)
    flat = torch.tensor(offsets, device=argmax.device).take(position) + start
    out = picked.new_zeros((*lead, size[0] * size[1]))
    out.scatter_add_(-1, flat.flatten(-2), picked.flatten(-2))
    return out.reshape(*lead, *size)
''',
    "_first_max_col2im": '''def _first_max_col2im(windows, g, kernel, stride, dilation):
    """_argmax_col2im at each window's first maximum."""
    return _argmax_col2im(_first_argmax(windows), g, kernel, stride, dilation)
''',
    "_scatter_rows": '''def _scatter_rows(rows, ids, count):
    """Each id's rows summed into its row of a zero (count, width) array."""
    ids = ids.reshape(-1)
    rows = rows.reshape(len(ids), rows.shape[-1])
    return rows.new_zeros((count, rows.shape[1])).index_add_(0, ids, rows)
''',
}

#: The helpers each helper calls.
HELPER_CALLS = {
    "_col2im_tensordot": ("_col2im", "_col2im_conv"),
    "_window_tensordot": ("_windows", "_window_conv", "_conv2d_as_input_grad"),
    "_first_max_col2im": ("_first_argmax", "_argmax_col2im"),
}


def helper_closure(names) -> list[str]:
    """The helpers ``names`` and those they call, in a deterministic order (callees first)."""
    found = set()
    for name in names:
        if name in HELPER_SOURCES:
            found |= {name, *HELPER_CALLS.get(name, ())}
    return [name for name in HELPER_SOURCES if name in found]
