"""From index notation to whole-array form.

``dx[n, i] = Sum_k dz[n, k] W[i, k]`` becomes ``dz @ W.T``; ``dgamma[j] = Sum_m dy[m, j]
xhat[m, j]`` becomes ``sum(dy * xhat, axis 0)``. The whole-array form is a sympy expression over
array-valued symbols and the small set of array operations below (printing-only functions: they
are never differentiated), so that the NumPy and LaTeX printers can both print it, and sympy's
``cse`` can share sub-expressions across a layer's formulas.

:func:`stabilize` applies exact rewrites that make the printed code safe for large inputs
(``log(1 + exp(u))`` -> ``softplus(u)``, rational functions of ``exp(u)`` -> ``sigmoid(u)``,
``log(sum(exp))`` -> a max-shifted log-sum-exp, ``exp(v - lse)`` -> a softmax of shifted
exponentials); they change how a value is computed, never the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

from ..declare.forms import N as BATCH
from ..declare.forms import WindowMax
from ..errors import DerivationError
from .array_ops import (  # noqa: F401 (importable from here)
    ArgmaxMask,
    ArrayOp,
    Col2Im,
    Dot,
    Einsum,
    Erfc,
    FirstArgmaxMask,
    Flipped,
    MaxOver,
    NewAxis,
    Permute,
    Reshape,
    Shifted,
    Sigmoid,
    Softplus,
    Step,
    SumOver,
    TensorDot,
    WindowArgmaxIndex,
    WindowMaximum,
    Windows,
    c_order_position,
)
from .parts import part_read

Axes = tuple[sp.Symbol, ...]


def _is_index(symbol) -> bool:
    return isinstance(symbol, sp.Symbol) and symbol.is_integer and symbol.is_positive is not True


class Lowering:
    """Lower index expressions; ``scalars`` are symbols that stay scalars (sizes, constants)."""

    def __init__(self, array_names: set[str], form=None):
        self.array_names = array_names
        self.preferred: Axes = ()
        self.sizes: dict[sp.Symbol, sp.Expr] = {}
        self.window_dims = frozenset()
        self.size_rules: dict[sp.Symbol, sp.Expr] = {}
        if form is not None:
            self.window_dims = form.window_dims
            self.size_rules = dict(form.size_rules)
            for stage in form.stages:
                self.sizes.update(zip(stage.indices, stage.array.dims, strict=True))
            for array in form.arrays.values():
                self.sizes.update(zip(form.indices_for(array), array.dims, strict=True))
        self.symbols: dict[str, sp.Symbol] = {}
        self.dims = {a.name: a.dims for a in form.arrays.values()} if form is not None else {}

    def symbol(self, name: str) -> sp.Symbol:
        if name not in self.symbols:
            self.symbols[name] = sp.Symbol(name, real=True)
        return self.symbols[name]

    def lower(self, expr: sp.Expr, axes: Sequence[sp.Symbol]) -> sp.Expr:
        """``expr`` as a whole-array expression whose axes are ``axes``, in that order."""
        self.preferred = tuple(axes)
        reshaped = self._reshape(expr, tuple(axes))
        if reshaped is not None:
            return reshaped
        array, have = self._lower(expr)
        if set(have) - set(axes):
            raise DerivationError(f"{expr} has free indices {have} beyond {tuple(axes)}")
        return align(array, have, tuple(axes), full=True)

    def _reshape(self, expr: sp.Expr, axes: Axes) -> sp.Expr | None:
        """``Reshape(a, dims)`` when ``expr`` at ``axes`` moves the numbers of one array, batch
        row by batch row, to the same C-order flat positions: ``a[n, c*H*W + h*W + w]`` at
        ``(n, c, h, w)`` (unflatten) or ``sum_{c,h,w} delta(k, c*H*W + h*W + w) a[n, c, h, w]``
        at ``(n, k)`` (flatten)."""
        if len(axes) < 2 or any(a not in self.sizes for a in axes):
            return None
        # (an array read at its own indices is no reshape: both ranks must differ)
        if isinstance(expr, sp.Indexed) and len(expr.indices) == 2 and len(axes) > 2:
            batch, position = expr.indices
            if batch == axes[0]:
                want = c_order_position(axes[1:], [self.sizes[a] for a in axes[1:]])
                if sp.expand(position - want) == 0:
                    dims = [self.sizes[a] for a in axes]
                    return Reshape(self.symbol(expr.base.name), *dims)
        if isinstance(expr, sp.Sum) and len(axes) == 2 and isinstance(expr.function, sp.Mul):
            deltas = [f for f in expr.function.args if isinstance(f, sp.KroneckerDelta)]
            arrays = [f for f in expr.function.args if isinstance(f, sp.Indexed)]
            if len(deltas) != 1 or len(arrays) != 1 or len(expr.function.args) != 2:
                return None
            if len(expr.limits) < 2:
                return None
            (delta,), (array,) = deltas, arrays
            inner = tuple(array.indices[1:])
            if array.indices[0] != axes[0] or tuple(expr.variables) != inner:
                return None
            dims = [upper - lower + 1 for _, lower, upper in expr.limits]
            position = c_order_position(inner, dims)
            if axes[1] in delta.args and sp.expand(sum(delta.args) - axes[1] - position) == 0:
                return Reshape(self.symbol(array.base.name), self.sizes[axes[0]], sp.Mul(*dims))
        return None

    # -- recursive lowering -------------------------------------------------------------------
    def _lower(self, expr: sp.Expr) -> tuple[sp.Expr, Axes]:
        from . import gather, groups  # a group's sum or value; a read at ids, its scatter-add
        for special in (groups.lower_grouped, gather.lower_gathered):
            if (lowered := special(self, expr)) is not None:
                return lowered
        if isinstance(expr, sp.Indexed):
            indices = tuple(expr.indices)
            if len(set(indices)) == len(indices) and all(i.is_Symbol for i in indices):
                return part_read(self, expr.base.name, indices), indices
            return self._lower_compound(expr)
        if type(expr).__name__ in ("WindowMax", "WindowArgmax"):
            self._record(expr.limits)
            array, have = self._lower(expr.function)
            bound = [v for v in expr.variables]
            positions = tuple(have.index(b) for b in bound)
            kept = tuple(a for a in have if a not in bound)
            if isinstance(array, Windows) and positions == (len(have) - 2, len(have) - 1):
                op = WindowMaximum if type(expr).__name__ == "WindowMax" else WindowArgmaxIndex
                return op(array), kept
            if type(expr).__name__ == "WindowArgmax":
                raise DerivationError(f"an arg-max over other axes than a window's: {expr}")
            return MaxOver(array, sp.Tuple(*positions)), kept
        if type(expr).__name__ == "ArgmaxAt":  # a kept arg-max position, at kernel offsets
            position, *offsets, height, width = expr.args
            array, have = self._lower(position)
            self.sizes.update({offsets[0]: height, offsets[1]: width})
            return ArgmaxMask(array, height, width), (*have, *offsets)
        if type(expr).__name__ == "FirstArgmax":
            window_max = expr.args[0]
            self._record(window_max.limits)
            array, have = self._lower(window_max.function)
            renames = dict(zip(window_max.variables, expr.args[1:], strict=True))
            return FirstArgmaxMask(array), tuple(renames.get(a, a) for a in have)
        if isinstance(expr, sp.Symbol):
            if expr.name in self.array_names:
                return self.symbol(expr.name), ()
            if _is_index(expr) and expr in self.sizes:  # an index as a number: its positions
                from .broadcast import Positions
                return Positions(self.sizes[expr]), (expr,)
            return expr, ()
        if expr.is_Number or isinstance(expr, sp.NumberSymbol):
            return expr, ()
        if isinstance(expr, sp.Sum):
            return self._lower_sum(expr)
        if isinstance(expr, sp.KroneckerDelta):
            raise DerivationError(f"a Kronecker delta survived elimination: {expr}")
        if isinstance(expr, sp.Heaviside):
            array, have = self._lower(expr.args[0])
            at_zero = expr.args[1] if len(expr.args) > 1 else sp.S.Half
            return (Step(array) if at_zero == 0 else Step(array, at_zero)), have
        if isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum):
            lse = self._log_sum_exp(expr.args[0])
            if lse is not None:
                return lse
        if isinstance(expr, sp.Mul):
            coefficient, rest = expr.as_coeff_Mul()
            if coefficient != 1 and rest != 1:
                array, have = self._lower(rest)
                return coefficient * array, have
        if isinstance(expr, sp.Piecewise):
            return self._elementwise(
                expr, [a for pair in expr.args for a in pair], lambda *a: _piecewise(a)
            )
        if isinstance(expr, sp.Add | sp.Mul | sp.Pow | sp.Function | sp.Rel | sp.Max | sp.Min):
            return self._elementwise(expr, list(expr.args), lambda *a: expr.func(*a))
        if expr in (sp.true, sp.false):
            return expr, ()
        raise DerivationError(f"cannot lower {expr!r} ({type(expr).__name__})")

    def _elementwise(self, expr, args, build):
        lowered = [self._lower(a) for a in args]
        target = union_axes([have for _, have in lowered])
        aligned = [
            -align(-array, have, target)  # a shift by a maximum: z - m[:, None]
            if isinstance(expr, sp.Add) and isinstance(-array, MaxOver)
            else align(array, have, target)
            for array, have in lowered
        ]
        return build(*aligned), target

    def _record(self, limits) -> None:
        for index, low, high in limits:
            self.sizes[index] = high - low + 1

    def _lower_compound(self, expr: sp.Indexed) -> tuple[sp.Expr, Axes]:
        """Elements with shifted (``u - P``), windowed (``p*S + i*D``, possibly shifted too) or
        reversed (``K - 1 - k``) indices."""
        array = self.symbol(expr.base.name)
        axes: list[sp.Symbol] = []
        offsets, shifted_sizes, windows, flipped = [], [], [], []
        for position, index in enumerate(expr.indices):
            index = sp.expand(index)
            symbols = sorted((s for s in index.free_symbols if _is_index(s)), key=str)
            linear = sum(index.coeff(s) * s for s in symbols)
            constant = index - linear
            if len(symbols) == 1 and index.coeff(symbols[0]) == 1:
                symbol = symbols[0]
                offsets.append(constant)
                shifted_sizes.append(self.sizes[symbol])
                axes.append(symbol)
            elif (len(symbols) == 1 and index.coeff(symbols[0]) == -1
                  and constant == self.sizes.get(symbols[0], sp.nan) - 1):
                offsets.append(sp.S.Zero)
                shifted_sizes.append(self.sizes[symbols[0]])
                flipped.append(position)
                axes.append(symbols[0])
            elif len(symbols) == 2 and not (constant.free_symbols & set(symbols)):
                kernel = [s for s in symbols if self.sizes.get(s) in self.window_dims]
                if len(kernel) != 1:
                    raise DerivationError(f"cannot tell the window in {expr}")
                (inner,) = kernel
                (outer,) = [s for s in symbols if s != inner]
                stride, dilation = index.coeff(outer), index.coeff(inner)
                if not (stride.is_positive and dilation.is_positive):
                    raise DerivationError(f"cannot lower the element {expr} to a whole array")
                windows.append((position, outer, inner, stride, dilation))
                # A window read at an offset reads the array shifted by it (zero-padded).
                offsets.append(constant)
                shifted_sizes.append((self.sizes[outer] - 1) * stride
                                     + (self.sizes[inner] - 1) * dilation + 1)
                axes.append(outer)
            else:
                raise DerivationError(f"cannot lower the element {expr} to a whole array")
        if any(offset != 0 for offset in offsets):
            first = next(k for k, offset in enumerate(offsets) if offset != 0)
            array = Shifted(array, sp.Tuple(*offsets[first:]), sp.Tuple(*shifted_sizes[first:]))
        if flipped:
            array = Flipped(array, sp.Tuple(*flipped))
        if windows:
            if [w[0] for w in windows] != list(range(len(expr.indices) - 2, len(expr.indices))):
                raise DerivationError(f"windows must be over the last two axes: {expr}")
            strides = {w[3] for w in windows}
            dilations = {w[4] for w in windows}
            if len(strides) != 1 or len(dilations) != 1:
                raise DerivationError(f"one stride and dilation per window: {expr}")
            kernel = sp.Tuple(*[self.sizes[w[2]] for w in windows])
            array = Windows(array, kernel, strides.pop(), dilations.pop())
            axes += [w[2] for w in windows]
        return array, tuple(axes)

    def _lower_scatter(self, expr: sp.Sum):
        """``Sum cols * delta(u + off, p*S + i*D) ...`` as a scatter-add over windows."""
        bound = {limit[0] for limit in expr.limits}
        for index, low, high in expr.limits:
            self.sizes[index] = high - low + 1
        factors = sp.Mul.make_args(expr.function)
        deltas = [f for f in factors if isinstance(f, sp.KroneckerDelta)]
        rest = sp.Mul(*[f for f in factors if not isinstance(f, sp.KroneckerDelta)])
        pairs = []
        for delta in deltas:
            sides = [sp.expand(side) for side in delta.args]
            combined = [side for side in sides if len(side.free_symbols & bound) == 2]
            target = [side for side in sides if not side.free_symbols & bound]
            if len(combined) != 1 or len(target) != 1:
                raise DerivationError(f"cannot lower {delta} as a scatter")
            (comb,), (tgt,) = combined, target
            symbols = sorted(comb.free_symbols & bound, key=str)
            inner = [s for s in symbols if self.sizes.get(s) in self.window_dims]
            if len(inner) != 1:
                raise DerivationError(f"cannot tell the window in {delta}")
            (outer,) = [s for s in symbols if s != inner[0]]
            free = [s for s in tgt.free_symbols if _is_index(s)]
            if len(free) != 1:
                raise DerivationError(f"cannot lower {delta} as a scatter")
            pairs.append((outer, inner[0], comb.coeff(outer), comb.coeff(inner[0]), free[0],
                          tgt - free[0]))
        used = {p[0] for p in pairs} | {p[1] for p in pairs}
        others = [limit for limit in expr.limits if limit[0] not in used]
        cols_expr = sp.Sum(rest, *others) if others else rest
        outer_preferred = self.preferred
        free = {s for s in cols_expr.free_symbols if _is_index(s)} - used
        lead = tuple(a for a in outer_preferred if a in free)
        lead += tuple(sorted(free - set(lead), key=str))
        self.preferred = lead + tuple(p[0] for p in pairs) + tuple(p[1] for p in pairs)
        array, have = self._lower(cols_expr)
        self.preferred = outer_preferred
        target = lead + tuple(p[0] for p in pairs) + tuple(p[1] for p in pairs)
        array = align(array, have, target, full=True)
        kernel = sp.Tuple(*[self.sizes[p[1]] for p in pairs])
        scattered = Col2Im(array, kernel, pairs[0][2], pairs[0][3])
        offsets = sp.Tuple(*[p[5] for p in pairs])
        sizes = sp.Tuple(*[self.sizes[p[4]] for p in pairs])
        axes = lead + tuple(p[4] for p in pairs)
        # The scatter's extent, (P - 1)*S + (K - 1)*D + 1 per axis: when it is the target's
        # size and nothing is shifted, the shift would copy the array as it is.
        extents = [((self.sizes[p[0]] - 1) * p[2] + (self.sizes[p[1]] - 1) * p[3] + 1)
                   .xreplace(self.size_rules) for p in pairs]
        if all(o == 0 for o in offsets) and all(
            sp.simplify(e - size.xreplace(self.size_rules)) == 0
            for e, size in zip(extents, sizes, strict=True)
        ):
            return scattered, axes
        return Shifted(scattered, offsets, sizes), axes

    def _lower_sum(self, expr: sp.Sum) -> tuple[sp.Expr, Axes]:
        bound = [limit[0] for limit in expr.limits]
        for index, low, high in expr.limits:
            self.sizes[index] = high - low + 1
        if any(isinstance(f, sp.KroneckerDelta) for f in sp.Mul.make_args(expr.function)):
            return self._lower_scatter(expr)
        expr = self._kernel_forwards(expr)
        contraction = self._contraction(expr.function, bound)
        if contraction is not None:
            return contraction
        array, have = self._lower(expr.function)
        positions = tuple(have.index(b) for b in bound if b in have)
        if len(positions) != len(bound):
            raise DerivationError(f"a bound index does not occur in the summand of {expr}")
        result_axes = tuple(a for a in have if a not in bound)
        return SumOver(array, sp.Tuple(*sorted(positions))), result_axes

    def _kernel_forwards(self, expr: sp.Sum) -> sp.Sum:
        """A window read backwards (``dy[n, o, h + P - k]``, a full convolution) with its kernel
        offset renamed ``k -> K - 1 - k``: the window is read forwards over a shifted array, and
        the other factor (the kernel, ``W[o, c, K - 1 - k]``) flipped instead."""
        backwards = set()
        for element in expr.function.atoms(sp.Indexed):
            for index in element.indices:
                index = sp.expand(index)
                symbols = [s for s in index.free_symbols if _is_index(s)]
                for symbol in symbols:
                    if (len(symbols) == 2 and index.coeff(symbol) == -1
                            and self.sizes.get(symbol) in self.window_dims
                            and symbol in expr.variables):
                        backwards.add(symbol)
        if not backwards:
            return expr
        renamed = {k: self.sizes[k] - 1 - k for k in backwards}
        return sp.Sum(expr.function.xreplace(renamed), *expr.limits)

    def _contraction(self, body: sp.Expr, bound: list[sp.Symbol]):
        """``Sum_k A[i, k] B[k, j]`` (either operand 1-D or 2-D, any orientation) as ``@``."""
        outside, inside = [], []
        for factor in sp.Mul.make_args(body):
            (inside if set(bound) & factor.free_symbols else outside).append(factor)
        if not all(isinstance(f, sp.Indexed) for f in inside):
            return None
        if len(inside) > 2:  # ``Sum_k dy[n, k] gamma[k] xhat[n, k]``: ``(dy*xhat) @ gamma``
            inside = _two_sides(inside, bound)
            if inside is None:
                return None
        if len(inside) != 2:
            return None
        lowered = [self._lower(f) for f in inside]
        if len(bound) != 1 or any(len(have) > 2 for _, have in lowered):
            return self._einsum(lowered, bound, outside)
        (k,) = bound
        if any(len(have) > 2 for _, have in lowered):
            return None
        options = [self._oriented(k, *lowered), self._oriented(k, *reversed(lowered))]
        options = [o for o in options if o is not None]
        if not options:
            return None
        _, product, axes = min(options, key=lambda option: option[0])
        return self._times_outside(product, axes, outside)

    def _times_outside(self, product, axes, outside):
        """``product`` (over ``axes``) times the factors that stayed outside the contraction."""
        if outside:
            rest, rest_axes = self._lower(sp.Mul(*outside))
            target = union_axes([axes, rest_axes])
            product = align(product, axes, target) * align(rest, rest_axes, target)
            axes = target
        return product, axes

    def _einsum(self, lowered, bound, outside):
        (a, axes_a), (b, axes_b) = lowered
        if not set(bound) <= set(axes_a) | set(axes_b):
            return None
        free = [i for i in union_axes([axes_a, axes_b]) if i not in bound]
        wanted = [i for i in self.preferred if i in free]
        if len(wanted) == len(free):
            free = wanted
        letters = {}
        for axis in list(axes_a) + list(axes_b):
            letters.setdefault(axis, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
        spec = (
            "".join(letters[i] for i in axes_a) + "," + "".join(letters[i] for i in axes_b)
            + "->" + "".join(letters[i] for i in free)
        )
        product: sp.Expr = Einsum(sp.Symbol(spec), a, b)
        shared = set(axes_a) & set(axes_b) - set(bound)
        paired = all(i in axes_a and i in axes_b for i in bound)
        if paired and not shared:
            # One matrix product; second: an operand with a free batch axis, else windows.
            if (self._free_batch(axes_a, bound), isinstance(a, Windows)) > (
                    self._free_batch(axes_b, bound), isinstance(b, Windows)):
                (a, axes_a), (b, axes_b) = (b, axes_b), (a, axes_a)
            rest = [i for i in axes_a if i not in bound] + [i for i in axes_b if i not in bound]
            summed = sorted(bound, key=axes_b.index)  # in the second operand's axis order
            product = TensorDot(
                a,
                b,
                sp.Tuple(*[axes_a.index(i) for i in summed]),
                sp.Tuple(*[axes_b.index(i) for i in summed]),
                sp.Tuple(*[rest.index(i) for i in free]),
            )
        axes = tuple(free)
        return self._times_outside(product, axes, outside)

    def _free_batch(self, axes: Axes, bound) -> bool:
        return any(self.sizes.get(i) == BATCH and i not in bound for i in axes)

    def _oriented(self, k, first, second):
        """``first @ second`` contracting ``k``, with its cost in transposes (or None)."""
        (a, axes_a), (b, axes_b) = first, second
        free_a = [i for i in axes_a if i != k]
        free_b = [i for i in axes_b if i != k]
        if set(free_a) & set(free_b):
            return None
        cost = 0
        if len(axes_a) == 2 and axes_a[1] != k:
            a, cost = Permute(a), cost + 1
        if len(axes_b) == 2 and axes_b[0] != k:
            b, cost = Permute(b), cost + 1
        axes = tuple(free_a + free_b)
        wanted = [i for i in self.preferred if i in axes]
        if len(wanted) == len(axes) and list(axes) != wanted:
            cost += 1
        return cost, Dot(a, b), axes

    def _log_sum_exp(self, total: sp.Sum):
        """``log(Sum_k exp(u))`` as ``m + log(Sum_k exp(u - m))`` with ``m = max_k u``."""
        if len(total.limits) != 1 or not isinstance(total.function, sp.exp):
            return None
        k = total.limits[0][0]
        u = total.function.args[0]
        if k not in self._lower(u)[1]:
            return None
        # The index form softmax_form writes too, so that both lower to the same arrays.
        peak = WindowMax(u, *total.limits)
        shifted, rest = self._lower(sp.Sum(sp.exp(u - peak), *total.limits))
        top, have = self._lower(peak)
        return sp.log(shifted) + align(top, have, rest), rest


def _two_sides(factors, bound) -> list[sp.Expr] | None:
    """Array factors of a sum over one index as two sides: the one factor indexed by it alone
    (a vector) and the product of the others, so that the sum is one matrix-vector product
    with no array of the whole product in memory (``sum_k dy[n, k] gamma[k] xhat[n, k]``)."""
    vector = [f for f in factors if tuple(f.indices) == tuple(bound)]
    rest = [f for f in factors if f not in vector]
    return [sp.Mul(*rest), *vector] if len(bound) == len(vector) == 1 else None


def _piecewise(args) -> sp.Expr:
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    return sp.Piecewise(*pairs, evaluate=False)


def union_axes(groups: Sequence[Axes]) -> Axes:
    """All axes, ordered as in the operand with the most axes, then by first appearance."""
    ordered: list[sp.Symbol] = []
    for group in sorted(groups, key=len, reverse=True):
        for axis in group:
            if axis not in ordered:
                ordered.append(axis)
    return tuple(ordered)


def align(array: sp.Expr, have: Axes, target: Axes, *, full: bool = False) -> sp.Expr:
    """Permute and expand ``array`` (axes ``have``) so that it broadcasts against ``target``.

    Missing leading axes are left to NumPy's broadcasting unless ``full`` is set.
    """
    if not have:
        return array
    order = [a for a in target if a in have]
    if list(have) != order:
        perm = tuple(have.index(a) for a in order)
        array = Permute(array) if len(have) == 2 else Permute(array, sp.Tuple(*perm))
    first = target.index(order[0])
    missing = [p for p, a in enumerate(target) if a not in have and (full or p > first)]
    if missing:
        shift = 0 if full else first
        array = NewAxis(array, sp.Tuple(*[p - shift for p in missing]))
    return array
