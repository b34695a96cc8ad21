"""The torch target's window helpers (symbp/emit/torch_helpers.py): the routes through torch's
convolution kernels (_window_conv, _col2im_conv) compute the same contraction as the general
route (torch.tensordot over the strided windows, _col2im of the product), which is the
definition the derivation's formulas print. Oracle: the general route, evaluated directly, and
torch's own F.conv2d / autograd for the layout the generated modules use."""

import itertools
import random

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from symbp.emit.torch_helpers import HELPER_SOURCES  # noqa: E402


@pytest.fixture(scope="module")
def helpers():
    namespace = {"torch": torch}
    for source in HELPER_SOURCES.values():
        exec(source, namespace)  # the text the generated modules copy
    return namespace


def _general_window(h, a, x, kernel, stride, dilation, axes_a, axes_windows):
    windows = h["_windows"](x, kernel, stride, dilation)
    return torch.tensordot(a, windows, dims=(list(axes_a), list(axes_windows)))


def _general_col2im(h, a, b, axes_a, axes_b, order, kernel, stride, dilation):
    product = torch.tensordot(a, b, dims=(list(axes_a), list(axes_b))).permute(order)
    return h["_col2im"](product, kernel, stride, dilation)


def _cases(count=12, seed=0):
    """Random conv shapes: batch 1 included, strides 1-2, dilations 1-2, rectangular kernels,
    inputs zero-padded (as the modules pad them) or not."""
    rng = random.Random(seed)
    fixed = [(1, 1, 1, (5, 5), 1, 1, 0), (2, 3, 4, (2, 3), 2, 1, 1), (3, 2, 5, (3, 2), 1, 2, 2),
             (1, 4, 3, (3, 3), 2, 2, 1)]
    drawn = [(rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 5),
              (rng.randint(1, 4), rng.randint(1, 4)), rng.randint(1, 2), rng.randint(1, 2),
              rng.randint(0, 2)) for _ in range(count - len(fixed))]
    for n, c, o, kernel, stride, dilation, padding in fixed + drawn:
        x = torch.randn(n, c, rng.randint(9, 13), rng.randint(8, 12), dtype=torch.float64)
        yield F.pad(x, (padding,) * 4), o, kernel, stride, dilation


def _out_size(x, kernel, stride, dilation):
    return [(s - (k - 1) * dilation - 1) // stride + 1
            for s, k in zip(x.shape[2:], kernel, strict=True)]


def test_forward_route_equals_the_general_route_and_conv2d(helpers):
    for x, o, kernel, stride, dilation in _cases():
        weight = torch.randn(o, x.shape[1], *kernel, dtype=torch.float64)
        args = (kernel, stride, dilation, (1, 2, 3), (1, 4, 5))
        fast = helpers["_window_conv"](weight, x, *args)
        assert fast is not None
        torch.testing.assert_close(fast, _general_window(helpers, weight, x, *args),
                                   rtol=0, atol=1e-12)
        # the generated module's conv2d: out[o, n, p, q] permuted to [n, o, p, q]
        torch.testing.assert_close(
            helpers["_window_tensordot"](weight, x, *args).permute(1, 0, 2, 3),
            F.conv2d(x, weight, stride=stride, dilation=dilation), rtol=0, atol=1e-12)


def test_forward_route_with_the_weight_axes_in_another_order(helpers):
    x, o, kernel, stride, dilation = next(_cases(seed=3))
    weight = torch.randn(o, x.shape[1], *kernel, dtype=torch.float64)
    # weight stored as [i, o, j, c]: contracted axes (3, 0, 2) with windows' (c, i, j)
    stored = weight.permute(2, 0, 3, 1).contiguous()
    args = (kernel, stride, dilation, (3, 0, 2), (1, 4, 5))
    fast = helpers["_window_conv"](stored, x, *args)
    assert fast is not None
    torch.testing.assert_close(fast, _general_window(helpers, stored, x, *args),
                               rtol=0, atol=1e-12)


def test_weight_gradient_route_equals_the_general_route_and_autograd(helpers):
    for x, o, kernel, stride, dilation in _cases(seed=1):
        dy = torch.randn(x.shape[0], o, *_out_size(x, kernel, stride, dilation),
                         dtype=torch.float64)
        args = (kernel, stride, dilation, (0, 2, 3), (0, 2, 3))
        fast = helpers["_window_conv"](dy, x, *args)
        assert fast is not None
        torch.testing.assert_close(fast, _general_window(helpers, dy, x, *args),
                                   rtol=0, atol=1e-12)
        weight = torch.randn(o, x.shape[1], *kernel, dtype=torch.float64, requires_grad=True)
        F.conv2d(x, weight, stride=stride, dilation=dilation).backward(dy)
        torch.testing.assert_close(fast, weight.grad, rtol=0, atol=1e-12)


def test_input_gradient_route_equals_the_general_route_and_autograd(helpers):
    for x, o, kernel, stride, dilation in _cases(seed=2):
        weight = torch.randn(o, x.shape[1], *kernel, dtype=torch.float64)
        dy = torch.randn(x.shape[0], o, *_out_size(x, kernel, stride, dilation),
                         dtype=torch.float64)
        # the generated conv2d's dx: tensordot(W, dy) over o, [c, i, j, n, p, q] -> [n, c, p, q,
        # i, j]; and the same with the operands swapped
        for a, b, axes_a, axes_b, order in [(weight, dy, (0,), (1,), (3, 0, 4, 5, 1, 2)),
                                            (dy, weight, (1,), (0,), (0, 3, 1, 2, 4, 5))]:
            args = (a, b, axes_a, axes_b, order, kernel, stride, dilation)
            fast = helpers["_col2im_conv"](*args)
            assert fast is not None
            torch.testing.assert_close(fast, _general_col2im(helpers, *args), rtol=0, atol=1e-12)
        # autograd's dx covers x's rows and columns that no window reads with zeros
        leaf = x.clone().requires_grad_(True)
        F.conv2d(leaf, weight, stride=stride, dilation=dilation).backward(dy)
        rows, columns = fast.shape[2:]
        torch.testing.assert_close(fast, leaf.grad[:, :, :rows, :columns], rtol=0, atol=1e-12)
        assert not leaf.grad[:, :, rows:].any() and not leaf.grad[:, :, :, columns:].any()


def test_other_contractions_take_the_general_route(helpers):
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    kernel = (3, 3)
    # not a convolution: a depthwise-like contraction (c kept), a single-window-axis sum
    a3 = torch.randn(3, 3, 3, dtype=torch.float64)
    assert helpers["_window_conv"](a3, x, kernel, 1, 1, (1, 2), (4, 5)) is None
    a4 = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    args = (kernel, 1, 1, (0, 1, 2), (0, 1, 4))
    assert helpers["_window_conv"](a4, x, *args) is None
    torch.testing.assert_close(helpers["_window_tensordot"](a4, x, *args),
                               _general_window(helpers, a4, x, *args), rtol=0, atol=0)
    # a kernel broadcast from size 1 (as pooling's routing passes it) is no convolution
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 3, 1, 1, dtype=torch.float64)
    assert helpers["_col2im_conv"](w, g, (0,), (1,), (3, 0, 4, 5, 1, 2), kernel, 1, 1) is None
    # the index roles mixed between operands
    for order in itertools.islice(itertools.permutations(range(6)), 1, 40):
        if order in {(3, 0, 4, 5, 1, 2)}:
            continue
        w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
        g = torch.randn(3, 3, 3, 3, dtype=torch.float64)
        assert helpers["_col2im_conv"](w, g, (0,), (1,), order, kernel, 1, 1) is None


def _pool_cases(seed=0):
    """Windows of x with ties (small integers) and NaN: strides 1-2, dilations 1-2,
    rectangular kernels, batch 1."""
    rng = random.Random(seed)
    for n, kernel, stride, dilation in [(1, (2, 2), 2, 1), (2, (3, 2), 1, 1), (1, (2, 3), 2, 2),
                                        (3, (3, 3), 2, 1), (2, (1, 4), 1, 2), (1, (5, 5), 3, 1),
                                        (2, (5, 4), 1, 1)]:
        x = torch.randint(-2, 3, (n, rng.randint(1, 3), rng.randint(9, 12), rng.randint(9, 12)),
                          generator=torch.Generator().manual_seed(rng.randint(0, 99)))
        yield x.double(), kernel, stride, dilation


def test_window_max_and_first_argmax_keep_the_first_maximum(helpers):
    for x, kernel, stride, dilation in _pool_cases():
        for with_nan in (False, True):
            if with_nan:
                x = x.clone()
                x[..., 1::3, ::2] = float("nan")
            windows = helpers["_windows"](x, kernel, stride, dilation)
            top = helpers["_window_max"](windows)
            torch.testing.assert_close(top, windows.amax(dim=(-2, -1)), rtol=0, atol=0,
                                       equal_nan=True)
            position = helpers["_first_argmax"](windows, top)
            assert position.dtype == torch.uint8
            # torch.argmax returns the first maximal value (NaN counts as the maximum)
            expected = windows.flatten(-2).argmax(dim=-1)
            assert torch.equal(position.long(), expected)
            assert torch.equal(helpers["_first_argmax"](windows).long(), expected)
            # and, by hand, the first row-major offset holding the maximum, on one window
            flat = windows.flatten(-2)[0, 0, 0, 0].tolist()
            if not any(v != v for v in flat):
                assert position[0, 0, 0, 0] == flat.index(max(flat))


def test_col2im_is_the_adjoint_of_windows(helpers):
    for x, kernel, stride, dilation in _pool_cases(seed=1):
        x = x.requires_grad_(True)
        windows = helpers["_windows"](x, kernel, stride, dilation)
        cols = torch.randn(windows.shape, dtype=torch.float64)
        (adjoint,) = torch.autograd.grad(windows, x, cols)
        out = helpers["_col2im"](cols, kernel, stride, dilation)
        rows, columns = out.shape[-2:]
        torch.testing.assert_close(out, adjoint[..., :rows, :columns], rtol=0, atol=1e-12)
        # a kernel broadcast from size 1: the same as the expanded columns
        g = torch.randn((*windows.shape[:-2], 1, 1), dtype=torch.float64)
        torch.testing.assert_close(helpers["_col2im"](g, kernel, stride, dilation),
                                   helpers["_col2im"](g.expand(windows.shape).clone(), kernel,
                                                      stride, dilation), rtol=0, atol=1e-12)


def test_argmax_col2im_equals_col2im_of_the_masked_columns(helpers):
    for x, kernel, stride, dilation in _pool_cases(seed=2):
        windows = helpers["_windows"](x, kernel, stride, dilation)
        argmax = helpers["_first_argmax"](windows, helpers["_window_max"](windows))
        mask = F.one_hot(argmax.long(), kernel[0] * kernel[1]).reshape(windows.shape)
        for g in (torch.randn((*windows.shape[:-2], 1, 1), dtype=torch.float64),
                  torch.randn(windows.shape, dtype=torch.float64)):
            expected = helpers["_col2im"](mask * g, kernel, stride, dilation)
            torch.testing.assert_close(
                helpers["_argmax_col2im"](argmax, g, kernel, stride, dilation), expected,
                rtol=0, atol=1e-12)
    # non-overlapping 2x2 windows without ties: torch's own max-pooling gradient
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    F.max_pool2d(x, 2).backward(dy)
    windows = helpers["_windows"](x.detach(), (2, 2), 2, 1)
    argmax = helpers["_first_argmax"](windows, helpers["_window_max"](windows))
    torch.testing.assert_close(
        helpers["_argmax_col2im"](argmax, dy[..., None, None], (2, 2), 2, 1), x.grad,
        rtol=0, atol=0)


@pytest.mark.parametrize("shape, dims", [
    ((4, 3, 5, 6), (0, 2, 3)),  # batch norm's per-channel sums
    ((4, 3, 5, 6), (0, 1, 2, 3)),  # everything
    ((4, 3, 5, 6), (2, 3)),  # the last axes alone
    ((4, 3, 5, 6), (1, 3)),  # the last axis and one between
    ((7, 5), (0,)),  # a batch of rows: the first axis (no dot product)
    ((7, 5), (1,)),
    ((2, 3, 4), (-1, 0)),  # negative axes
    ((5, 2, 256, 300), (0, 2, 3)),  # rows too big for one block: a block a row, added up
])
def test_dot_sum_is_the_product_summed(helpers, shape, dims):
    """_dot_sum (batch norm's sum(dy*xhat), sum(x_minus_mu**2)) computes (a*b).sum(dims)
    whichever axes are summed: block by block of rows where the first axis is summed, by the
    product's sum otherwise."""
    # (rtol: another order of the additions, ~1e-16 each, over up to 4e5 products)
    generator = torch.Generator().manual_seed(len(shape) + len(dims))
    a = torch.randn(shape, dtype=torch.float64, generator=generator)
    b = torch.randn(shape, dtype=torch.float64, generator=generator)
    expected = (a * b).sum(dim=dims)
    torch.testing.assert_close(helpers["_dot_sum"](a, b, dims), expected, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(helpers["_dot_sum"](a, a, dims), (a * a).sum(dim=dims),
                               rtol=1e-13, atol=1e-12)
    # a permuted (non-contiguous) operand, as a convolution's output is
    c = torch.randn(tuple(reversed(shape)), dtype=torch.float64, generator=generator)
    c = c.permute(*reversed(range(len(shape))))
    torch.testing.assert_close(helpers["_dot_sum"](c, b, dims), (c * b).sum(dim=dims),
                               rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("channels, dilation", [(16, 1), (17, 2), (32, 1)])
def test_float64_forward_route_by_the_input_gradient_kernel(helpers, channels, dilation):
    """With 16 or more input channels in float64 on the CPU, _window_conv computes conv2d by the
    kernel of a convolution's input gradient (_conv2d_as_input_grad): the same contraction as
    the general route and as F.conv2d, the weight's axes in either order."""
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(3, channels, 11, 10, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, channels, 3, 2, dtype=torch.float64, generator=generator)
    args = ((3, 2), 1, dilation, (1, 2, 3), (1, 4, 5))
    expected = _general_window(helpers, weight, x, *args)
    torch.testing.assert_close(helpers["_window_conv"](weight, x, *args), expected,
                               rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(helpers["_conv2d_as_input_grad"](x, weight, dilation),
                               F.conv2d(x, weight, dilation=dilation), rtol=1e-13, atol=1e-12)
    permuted = weight.permute(1, 0, 2, 3)  # a[c, o, i, j]: the gather's flipped weight reads so
    args = ((3, 2), 1, dilation, (0, 2, 3), (1, 4, 5))
    torch.testing.assert_close(helpers["_window_conv"](permuted, x, *args),
                               _general_window(helpers, permuted, x, *args), rtol=1e-13, atol=1e-12)


def test_first_argmax_of_tied_windows_is_the_first_offset(helpers):
    """Windows of a ReLU's output hold many tied maxima (zeros): the kept position is the
    first offset holding the maximum, as torch.argmax returns it."""
    for x, kernel, stride, dilation in _pool_cases():
        tied = x.clamp(min=0).round()  # zeros and small integers: ties everywhere
        windows = helpers["_windows"](tied, kernel, stride, dilation)
        position = helpers["_first_argmax"](windows, helpers["_window_max"](windows))
        assert torch.equal(position.long(), windows.flatten(-2).argmax(dim=-1))


@pytest.mark.parametrize("channels", [3, 16])
def test_a_bias_is_added_along_the_free_axis_of_a(helpers, channels):
    """_window_tensordot(..., bias): the product plus bias along a's free axis (the product's
    first), fused into conv2d (or added after the input-gradient kernel, 16 channels in
    float64) and added after the general route alike; F.conv2d with the bias agrees."""
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(3, channels, 9, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, channels, 3, 2, dtype=torch.float64, generator=generator)
    bias = torch.randn(4, dtype=torch.float64, generator=generator)
    args = ((3, 2), 1, 1, (1, 2, 3), (1, 4, 5))
    expected = _general_window(helpers, weight, x, *args) + bias[:, None, None, None]
    got = helpers["_window_tensordot"](weight, x, *args, bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.permute(1, 0, 2, 3), F.conv2d(x, weight, bias),
                               rtol=0, atol=1e-12)
    # a contraction that is no convolution: the general route, the bias added after it
    a4 = torch.randn(3, channels, 3, 2, dtype=torch.float64, generator=generator)
    other = ((3, 2), 1, 1, (0, 1, 2), (0, 1, 4))
    assert helpers["_window_conv"](a4, x, *other, None) is None
    free = torch.randn(2, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        helpers["_window_tensordot"](a4, x, *other, free),
        _general_window(helpers, a4, x, *other) + free.reshape(2, 1, 1, 1),
        rtol=0, atol=1e-12)
