"""Print whole-array sympy expressions as PyTorch code.

:class:`SymbpTorchPrinter` derives from the NumPy printer
(:class:`~symbp.emit.numpy_printer.SymbpNumPyPrinter`): the same lowered expressions, the same
choices of form, with ``torch.`` in place of ``np.`` and the spellings where the two libraries
differ (``dim=`` reductions, ``torch.clamp`` against a number, ``permute``). NumPy's memory
helpers (``_along_rows``, ``_row_vector``) become the plain operations they compute. A JAX
printer can be derived the same way (``jnp.`` in place of ``np.``).

The generated module copies the few helpers printed code calls from
:mod:`symbp.emit.torch_helpers`.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE

from ..derivation.array_ops import Dot, NewAxis, Permute
from ..derivation.arrays import Step
from .array_shapes import array_shape, is_smaller
from .numpy_printer import SymbpNumPyPrinter
from .torch_helpers import HELPER_SOURCES

#: numpy name -> torch name, where they differ
_RENAMED = {
    "heaviside": "heaviside",
    "transpose": "permute",
    "arctan2": "atan2",
    "power": "pow",
    "amax": "amax",
    "amin": "amin",
}

#: a bool tensor's bytes (a view): 0 or 1, multiplied in the other factor's float type
_BYTES = ".view(torch.uint8)"


class TorchPrintError(ValueError):
    """An expression uses an array operation the torch printer does not print yet."""


class SymbpTorchPrinter(SymbpNumPyPrinter):
    """PyTorch code for array expressions, with ``torch`` as the module name."""

    def __init__(self, settings=None, shapes=None):
        super().__init__(settings, shapes)
        #: (function, printed arguments) of the last call a chain started with (line breaks)
        self.last_call: tuple[str, list[str]] | None = None
        # sympy's NumPy printer asks each node for ``_numpycode`` first; here a node's own
        # method is a fallback (:meth:`_print_Function`) after this printer's ``_print_<Node>``
        self.printmethod = "_symbp_torchcode"
        #: whether a boolean step prints as its bytes (see :meth:`_print_Mul`)
        self._byte_masks = False
        #: the arrays held as bools (kept steps, y_positive): 0/1 factors (see _print_Mul)
        self.bool_arrays: frozenset = frozenset()
        self._printing: list = []  # the nodes being printed, outermost first

    def _print_Function(self, expr):
        if hasattr(expr, "_numpycode"):  # symbp's array operations spelled alike in torch
            return expr._numpycode(self)
        return super()._print_Function(expr)

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        if text.startswith("np."):
            name = text[len("np.") :]
            return "torch." + _RENAMED.get(name, name)
        return text

    def _helper(self, key: str) -> str:
        name = super()._helper(key)
        if name not in HELPER_SOURCES:
            raise TorchPrintError(f"the torch target cannot print {key} yet")
        return name

    # -- spellings that differ ------------------------------------------------------------------
    def row_pass(self, ufunc, first, second, out=None):
        if out is not None:
            return f"torch.{ufunc}({self._print(first)}, {self._print(second)}, out={out})"
        operator = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}[ufunc]
        level = PRECEDENCE["Mul"] if ufunc in ("multiply", "divide") else PRECEDENCE["Add"]
        return (
            f"{self.parenthesize(first, level)} {operator} "
            f"{self.parenthesize(second, level + 1)}"
        )

    def _print_RowVector(self, expr):
        return self._print(expr.args[0])

    def _reduction(self, expr, method):
        array, axes = expr.args
        axes = tuple(int(a) for a in axes)
        dim = str(axes[0]) if len(axes) == 1 else str(axes)
        text = self.parenthesize(array, PRECEDENCE["Atom"], strict=True)
        return f"{text}.{'amax' if method == 'max' else method}(dim={dim})"

    def _fused_sum(self, expr):
        # the sum of a product of two arrays of one shape: ``_dot_sum`` (torch.einsum's route
        # copies both operands into a batched matrix product: 2-5x _dot_sum's time on batch
        # norm's (64, 64, 32, 32) sums); the plain sum over the first axis stays a sum (torch
        # has no BLAS detour to gain from)
        if self.shapes is None:
            return None
        array, axes = expr.args
        coefficient, rest = array.as_coeff_Mul()
        factors = list(sp.Mul.make_args(rest))
        if len(factors) == 1 and factors[0].is_Pow and factors[0].exp == 2:
            factors = [factors[0].base] * 2
        if len(factors) != 2 or not all(
            isinstance(f, sp.Symbol) and self.shapes.get(f.name) is not None for f in factors
        ):
            return None
        if len({self.shapes[f.name] for f in factors}) != 1:
            return None
        self.helpers_used.add("_dot_sum")
        dims = tuple(int(a) for a in axes)
        call = f"_dot_sum({factors[0]}, {factors[1]}, {dims})"
        return call if coefficient == 1 else f"{self._print(coefficient)}*{call}"

    # -- element-wise passes over a big array ----------------------------------------------------
    def _einsum_product(self, small, big, first, second):
        # NumPy's einsum detour (its multiply's short inner loops) is no gain in torch, which
        # broadcasts a per-channel factor at full speed
        level = PRECEDENCE["Mul"]
        head = self._print(small) if small.is_Mul else self.parenthesize(small, level)
        return f"{head}*{self.parenthesize(big, level)}"

    def _is_python_number(self, expr) -> bool:
        """Whether ``expr`` is a Python number at run time (numbers, sizes, keyword constants),
        not a tensor: what ``alpha=`` takes."""
        return all(s.name not in (self.shapes or {}) for s in expr.free_symbols) and not any(
            isinstance(a, sp.Indexed) for a in sp.preorder_traversal(expr))

    def _affine_terms(self, expr, shape):
        """``(small, [(k, B), ...])`` for ``expr`` (a sum, or a small factor times a sum) over
        arrays of ``shape``: the terms smaller than the array summed into ``small``, each other
        term split into its small coefficient ``k`` and the product ``B`` of its big factors (a
        small factor outside the sum multiplied into each, sympy's own expansion); None where
        ``expr`` is neither."""
        factor, body = sp.S.One, expr
        if isinstance(expr, sp.Mul):
            small = [f for f in expr.args if is_smaller(f, shape, self.shapes)]
            big = [f for f in expr.args if f not in small]
            if len(big) != 1 or not isinstance(big[0], sp.Add):
                return None
            factor, body = sp.Mul(*small), big[0]
        if not isinstance(body, sp.Add):
            return None
        smalls, products = [], []
        for term in self._as_ordered_terms(body):
            if is_smaller(term, shape, self.shapes):
                smalls.append(factor * term)
                continue
            parts = sp.Mul.make_args(term)
            k = [f for f in parts if is_smaller(f, shape, self.shapes)]
            products.append((factor * sp.Mul(*k), sp.Mul(*[f for f in parts if f not in k])))
        return (sp.Add(*smalls) if smalls else None), products

    def chained_pass(self, expr, donor: sp.Symbol | None = None):
        """``(start, updates, call)``: a sum over a big array (or a small factor times one) computed
        as one new tensor, ``start``, then updated in place by ``updates`` (method calls such
        as ``.addcmul_(k, B)``), a pass per big term: ``c + k*B + k2*B2`` as
        ``torch.addcmul(c, k, B)`` then ``.addcmul_(k2, B2)``, where the plain form makes a
        product array per coefficient and one more per sum. With ``donor`` (a temporary that
        nothing reads afterwards, a bare term of the sum) the sum is computed in its memory;
        ``call``: ``(function, arguments)`` where ``start`` is one call. None where the value
        is no such sum, or the plain form costs no more (``A + B``)."""
        if self.shapes is None:
            return None
        shape = array_shape(expr, self.shapes)
        if shape is None:
            return self._fresh_plus(expr, donor)
        if sum(d != 1 for d in shape) < 2:
            return None
        split = self._affine_terms(expr, shape)
        if split is None or not split[1]:
            return None
        small, products = split
        if donor is None and small is not None and products == [(1, products[0][1])] and (
                isinstance(products[0][1], Dot) and not self._is_python_number(small)):
            # x @ W + b: one BLAS call adds b (torch.addmm), where the plain form adds it in a
            # second pass over the product
            left, right = products[0][1].args
            if len(array_shape(left, self.shapes) or ()) == 2 == len(
                    array_shape(right, self.shapes) or ()):
                return self._call("torch.addmm", small, left, right), [], self.last_call
        plain = all(k in (1, -1) for k, _ in products) and small is None
        if donor is not None:
            if (1, donor) not in products or len(products) + (small is not None) < 2:
                return None
            products.remove((1, donor))
            start = donor.name
        elif plain and len(products) < 3:
            return None
        else:
            self.last_call = None
            start, used = self._chain_start(products, small)
            small = None if used else small
            call = self.last_call
        updates = [self._chain_update(k, big) for k, big in products]
        if small is not None:
            negative = small.could_extract_minus_sign()
            method = "sub_" if negative else "add_"
            updates.append(f".{method}({self._print(-small if negative else small)})")
        if donor is not None:  # the first update names the donor's memory as the value's
            start, updates, call = start + updates[0], updates[1:], None
        return start, updates, call

    def _chain_start(self, products, small):
        """``(call, whether it adds small)``: the call that makes the new tensor of a chain
        (what it uses taken out of ``products``): ``torch.addcmul(A, k, B)`` for a bare ``A``
        (``torch.add(A, B, alpha=k)`` for a number ``k``), ``torch.addcmul(c, k, B)`` for a
        small tensor ``c``, else the first product, or the first two terms' sum."""
        scaled = [p for p in products if p[0] not in (1, -1)]
        bare = [p for p in products if p[0] == 1]
        if scaled and bare:
            (k, big), (_, first) = scaled[0], bare[0]
            products.remove(scaled[0])
            products.remove(bare[0])
            if self._is_python_number(k):
                return self._call("torch.add", first, big, f"alpha={self._print(k)}"), False
            return self._call("torch.addcmul", first, k, big), False
        tensor_k = [p for p in scaled if not self._is_python_number(p[0])]
        if tensor_k and small is not None and not self._is_python_number(small):
            k, big = tensor_k[0]
            products.remove(tensor_k[0])
            return self._call("torch.addcmul", small, k, big), True
        if scaled:  # a new tensor: the product
            products.remove(scaled[0])
            k, big = scaled[0]
            return self._print(k * big), False
        first = products.pop(0)  # bare terms alone: the first two summed (a new tensor)
        if products:
            second = products.pop(0)
            return self._print(first[0] * first[1] + second[0] * second[1]), False
        return self._print(first[0] * first[1] + small), True

    def _call(self, function, *args) -> str:
        printed = [a if isinstance(a, str) else self._print(a) for a in args]
        self.last_call = (function, printed)
        return f"{function}({', '.join(printed)})"

    def _chain_update(self, k, big) -> str:
        if k == 1:
            return f".add_({self._print(big)})"
        if k == -1:
            return f".sub_({self._print(big)})"
        if self._is_python_number(k):
            return f".add_({self._print(big)}, alpha={self._print(k)})"
        return f".addcmul_({self._print(k)}, {self._print(big)})"

    def _fresh_plus(self, expr, donor):
        """``F`` then ``.add_(c)`` for ``F + c`` where ``F`` is a product the helpers compute
        into a new tensor whose shape the printer cannot tell (a convolution's output) and ``c``
        is the rest (its bias): the sum in the product's memory."""
        from .windows import Col2ImTensorDot, WindowTensorDot

        if donor is not None or not isinstance(expr, sp.Add):
            return None
        unknown = [t for t in expr.args if array_shape(t, self.shapes) is None]
        if len(unknown) != 1:
            return None
        (big,) = unknown
        inner = big.args[0] if isinstance(big, Permute) and len(big.args) == 2 else big
        if not isinstance(inner, WindowTensorDot | Col2ImTensorDot):
            return None
        rest = sp.Add(*[t for t in expr.args if t is not big])
        fused = self._with_bias(big, rest)
        if fused is not None:
            return fused, [], None
        negative = rest.could_extract_minus_sign()
        method = "sub_" if negative else "add_"
        return self._print(big), [f".{method}({self._print(-rest if negative else rest)})"], None

    def _with_bias(self, big, rest) -> str | None:
        """``_window_tensordot(..., bias)`` for a product of windows plus a vector along the
        product's first axis (a's free axis: a convolution's output channels, wherever the
        permutation around the product puts them), which conv2d adds in its own pass; None for
        any other sum."""
        from .windows import WindowTensorDot

        outer = [int(k) for k in big.args[1]] if isinstance(big, Permute) else None
        product = big.args[0] if outer is not None else big
        if not isinstance(product, WindowTensorDot):
            return None
        a, x, kernel, stride, dilation, axes_a, axes_windows, order = product.args
        rank = len(order)
        where = [int(k) for k in order].index(0)  # the product's first axis, after its order
        where = outer.index(where) if outer is not None else where
        own = array_shape(rest, self.shapes)
        vector = rest.args[0] if isinstance(rest, NewAxis) else rest
        a_shape = array_shape(a, self.shapes)
        if (own is None or not isinstance(vector, sp.Symbol)
                or len(array_shape(vector, self.shapes) or ()) != 1 or a_shape is None
                or len(a_shape) - len(axes_a) != 1 or rank < len(own)):
            return None
        sized = [k for k, d in enumerate(own) if d != 1]
        if len(sized) != 1 or rank - len(own) + sized[0] != where:
            return None
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        self.helpers_used.add("_window_tensordot")
        text = (
            f"_window_tensordot({self._print(a)}, {self._print(x)}, {kernel_text}, "
            f"{self._print(stride)}, {self._print(dilation)}, "
            f"{self._print_tuple(tuple(axes_a))}, {self._print_tuple(tuple(axes_windows))}, "
            f"{vector.name})"
        )
        text += self._transposed(order)
        return text + (self._transposed(outer) if outer is not None else "")

    def _print_Permute(self, expr):
        if len(expr.args) == 1:
            return super()._print_Permute(expr)
        perm = tuple(int(p) for p in expr.args[1])
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}.permute{perm}"

    @staticmethod
    def _transposed(order) -> str:
        if list(order) == list(range(len(order))):
            return ""
        return f".permute({', '.join(str(k) for k in order)})"

    def _print_TensorDot(self, expr):
        a, b, axes_a, axes_b, order = expr.args
        text = (
            f"torch.tensordot({self._print(a)}, {self._print(b)}, "
            f"dims=({list(int(k) for k in axes_a)}, {list(int(k) for k in axes_b)}))"
        )
        return text + self._transposed(order)

    def _print_Sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr):
        self.helpers_used.add("_softplus")
        return f"_softplus({self._print(expr.args[0])})"

    def _print(self, expr, **kwargs):
        self._printing.append(expr)
        try:
            return super()._print(expr, **kwargs)
        finally:
            self._printing.pop()

    def _is_mask(self, factor) -> bool:
        return isinstance(factor, Step) or (
            isinstance(factor, sp.Symbol) and factor.name in self.bool_arrays)

    def _print_Mul(self, expr):
        # a 0/1 factor (a step, a kept bool mask) of a product with a tensor in the float type
        # is printed as its bytes, bool viewed as uint8: torch converts uint8 to the float type
        # in its vectorised loop, bool element by element (dy*mask: 0.27x the time in float32,
        # 0.5x in float64 on (128, 6, 24, 24)). Not beside a Python number (2 or -1 times
        # uint8 stays uint8 and wraps, where bool promotes to int64)
        outer = self._byte_masks
        self._byte_masks = any(not self._is_mask(f) for f in expr.args) and not any(
            self._is_python_number(f) for f in expr.args if not self._is_mask(f))
        try:
            return super()._print_Mul(expr)
        finally:
            self._byte_masks = outer

    def _print_Symbol(self, expr):
        text = super()._print_Symbol(expr)
        if expr.name in self.bool_arrays and self._byte_factor():
            return text + _BYTES
        return text

    def _byte_factor(self) -> bool:
        """Whether the node being printed is a factor of the product being printed, one whose
        0/1 factors print as bytes."""
        return self._byte_masks and len(self._printing) > 1 and isinstance(
            self._printing[-2], sp.Mul)

    def _print_Step(self, expr):
        u, *at_zero = expr.args
        if expr in self._boolean_steps:
            return f"({self._print(u)} > 0){_BYTES if self._byte_factor() else ''}"
        text = self._print(u)
        value = repr(float(at_zero[0])) if at_zero else "0.0"
        return f"torch.heaviside({text}, torch.full_like({text}, {value}))"

    def _pairwise(self, function: str, args) -> str:
        first, *rest = sorted(args, key=lambda a: a.is_number)
        if len(rest) == 1 and rest[0].is_number:  # against a number: clamp
            bound = "min" if function.endswith("maximum") else "max"
            return f"torch.clamp({self._print(first)}, {bound}={self._print(rest[0])})"
        return super()._pairwise(function, args)

    def _print_Piecewise(self, expr):
        pairs = list(expr.args)
        if pairs[-1][1] != sp.true:
            raise TorchPrintError(f"a Piecewise without a final True branch: {expr}")
        text = self._print(pairs[-1][0])
        for value, condition in reversed(pairs[:-1]):
            printed_value, printed = self._print(value), self._print(condition)
            if any(type(a).__name__ == "Positions" for a in sp.preorder_traversal(condition)):
                # positions (a causal mask) are made on the CPU: moved to the value's device
                if printed_value.isidentifier():
                    printed = f"({printed}).to({printed_value}.device)"
            text = f"torch.where({printed}, {printed_value}, {text})"
        return text

    def _print_Positions(self, expr):
        return f"torch.arange({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"torch.special.erf({self._print(expr.args[0])})"

    def _print_erfc(self, expr):
        return f"torch.special.erfc({self._print(expr.args[0])})"

    _print_Erfc = _print_erfc

    def _print_Windows(self, expr):
        array, kernel, stride, dilation = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        self.helpers_used.add("_windows")
        return (
            f"_windows({self._print(array)}, {kernel_text}, {self._print(stride)}, "
            f"{self._print(dilation)})"
        )

    def _print_Flipped(self, expr):
        array, positions = expr.args
        dims = tuple(int(p) for p in positions)
        return f"torch.flip({self._print(array)}, {dims})"

    # -- symbp's array operations that NumPy spells its own way -----------------------------
    def _print_Broadcast(self, expr):
        array, dims = expr.args
        shape = ", ".join(self._print(d) for d in dims)
        return f"{self._print(array)}.expand({shape}).clone()"

    def _print_TakeRows(self, expr):
        table, ids = (self._print(a) for a in expr.args)
        return f"{table}[{ids}]"

    def _print_GroupRepeat(self, expr):
        array, times = expr.args
        count = " // ".join(self._print(part) for part in sp.fraction(times))
        return f"torch.repeat_interleave({self._print(array)}, {count}, dim=1)"

    def _print_GroupSum(self, expr):
        array, batch, groups = expr.args
        text = self.parenthesize(array, PRECEDENCE["Atom"], strict=True)
        return f"{text}.reshape({self._print(batch)}, {self._print(groups)}, -1).sum(dim=2)"

    def _print_Einsum(self, expr):
        spec, *operands = expr.args
        inputs, output = str(spec).split("->")
        letters = inputs.split(",")
        if len(letters) == 2 and letters[0] == letters[1] and len(set(letters[0])) == len(
                letters[0]) and set(output) <= set(letters[0]) and output == "".join(
                c for c in letters[0] if c in output):
            # an element-wise product summed over some axes: _dot_sum (see _fused_sum)
            self.helpers_used.add("_dot_sum")
            dims = tuple(k for k, c in enumerate(letters[0]) if c not in output)
            return f"_dot_sum({self._print(operands[0])}, {self._print(operands[1])}, {dims})"
        arguments = ", ".join(self._print(o) for o in operands)
        return f'torch.einsum("{spec}", {arguments})'
