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

class TorchPrintError(ValueError):
    """An expression uses an array operation the torch printer does not print yet."""


class SymbpTorchPrinter(SymbpNumPyPrinter):
    """PyTorch code for array expressions, with ``torch`` as the module name."""

    def __init__(self, settings=None, shapes=None):
        super().__init__(settings, shapes)
        # sympy's NumPy printer asks each node for ``_numpycode`` first; here a node's own
        # method is a fallback (:meth:`_print_Function`) after this printer's ``_print_<Node>``
        self.printmethod = "_symbp_torchcode"

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
        # the sum of a product of two arrays of one shape: torch.einsum as NumPy's; the plain
        # sum over the first axis stays a sum (torch has no BLAS detour to gain from)
        fused = super()._fused_sum(expr)
        if fused is None or "torch.ones(" in fused:
            return None
        return fused

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

    def _print_Step(self, expr):
        u, *at_zero = expr.args
        if expr in self._boolean_steps:
            return f"({self._print(u)} > 0)"
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
        arguments = ", ".join(self._print(o) for o in operands)
        return f'torch.einsum("{spec}", {arguments})'
