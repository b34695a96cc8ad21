"""Print whole-array sympy expressions as NumPy code.

A :class:`~sympy.printing.numpy.NumPyPrinter` subclass: the array operations of
:mod:`symbp.derive.arrays` get their own ``_print_<Class>`` methods, functions are printed with
the ``np.`` prefix, and number-valued constants (``sqrt(2)``, ``pi``) become Python float literals
so that they never turn a float32 computation into float64 (NumPy scalars would, Python floats
don't). The generated module needs NumPy alone; the few functions NumPy lacks (``erf``) are
printed as calls to helpers the module template defines when used (see :data:`HELPERS`).
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE, precedence

#: Functions NumPy lacks: the name printed for them, and the helper the module must define.
HELPERS = {
    "erf": "_erf",
    "erfc": "_erfc",
    "col2im": "_col2im",
    "shifted": "_shifted",
    "first_argmax_mask": "_first_argmax_mask",
}


class SymbpNumPyPrinter(NumPyPrinter):
    """NumPy code for array expressions, with ``np`` as the module name."""

    printmethod = "_symbp_numpycode"

    def __init__(self, settings=None):
        super().__init__({"fully_qualified_modules": True, **(settings or {})})
        self.helpers_used: set[str] = set()

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        return "np." + text[len("numpy.") :] if text.startswith("numpy.") else text

    # -- numbers --------------------------------------------------------------------------------
    def _print_constant(self, expr):
        return repr(float(expr))

    def _print_Pow(self, expr, rational=False):
        if expr.is_number and not expr.is_Rational:
            return self._print_constant(expr)
        if expr.exp == sp.Rational(-1, 2):
            return f"1/{self._module_format('numpy.sqrt')}({self._print(expr.base)})"
        if expr.exp == -1:
            return f"1/{self.parenthesize(expr.base, PRECEDENCE['Pow'])}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Mul(self, expr):
        if expr.is_number and not expr.is_Rational:
            return self._print_constant(expr)
        return super()._print_Mul(expr)

    def _print_NumberSymbol(self, expr):
        return self._print_constant(expr)

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Function(self, expr):
        if expr.is_number:
            return self._print_constant(expr)
        return super()._print_Function(expr)

    # -- array operations ---------------------------------------------------------------------
    def _print_Dot(self, expr):
        left, right = expr.args
        level = PRECEDENCE["Mul"]
        return f"{self.parenthesize(left, level)} @ {self.parenthesize(right, level + 1)}"

    def _print_Permute(self, expr):
        if len(expr.args) == 1:
            return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}.T"
        perm = tuple(int(p) for p in expr.args[1])
        return f"{self._module_format('numpy.transpose')}({self._print(expr.args[0])}, {perm})"

    def _reduction(self, expr, method):
        array, axes = expr.args
        axes = tuple(int(a) for a in axes)
        axis = str(axes[0]) if len(axes) == 1 else str(axes)
        return f"{self.parenthesize(array, PRECEDENCE['Atom'], strict=True)}.{method}(axis={axis})"

    def _print_SumOver(self, expr):
        return self._reduction(expr, "sum")

    def _print_MaxOver(self, expr):
        return self._reduction(expr, "max")

    def _print_NewAxis(self, expr):
        array, positions = expr.args
        positions = {int(p) for p in positions}
        slots = ["None" if p in positions else ":" for p in range(max(positions) + 1)]
        return f"{self.parenthesize(array, PRECEDENCE['Atom'], strict=True)}[{', '.join(slots)}]"

    def _print_Sigmoid(self, expr):
        # 1/(1 + exp(-u)) = exp(-log(1 + exp(-u))): no overflow, full relative accuracy.
        (u,) = expr.args
        softplus = f"{self._module_format('numpy.logaddexp')}(0, {self._print(-u)})"
        return f"{self._module_format('numpy.exp')}(-{softplus})"

    def _print_Softplus(self, expr):
        (u,) = expr.args
        return f"{self._module_format('numpy.logaddexp')}(0, {self._print(u)})"

    def _print_Step(self, expr):
        (u,) = expr.args
        return f"({self._print(u)} > 0)"

    def _print_Max(self, expr):
        if len(expr.args) != 2:
            return super()._print_Max(expr)
        first, second = sorted(expr.args, key=lambda a: a.is_number)
        return (
            f"{self._module_format('numpy.maximum')}({self._print(first)}, {self._print(second)})"
        )

    def _print_Min(self, expr):
        if len(expr.args) != 2:
            return super()._print_Min(expr)
        first, second = sorted(expr.args, key=lambda a: a.is_number)
        return (
            f"{self._module_format('numpy.minimum')}({self._print(first)}, {self._print(second)})"
        )

    def _print_Piecewise(self, expr):
        pairs = list(expr.args)
        value, _ = pairs[-1]
        if pairs[-1][1] != sp.true:
            raise ValueError(f"a Piecewise without a final True branch cannot be printed: {expr}")
        text = self._print(value)
        for value, condition in reversed(pairs[:-1]):
            where = self._module_format("numpy.where")
            text = f"{where}({self._print(condition)}, {self._print(value)}, {text})"
        return text

    def _print_Relational(self, expr):
        operator = {">": ">", "<": "<", ">=": ">=", "<=": "<="}.get(expr.rel_op)
        if operator is None:
            return super()._print_Relational(expr)
        level = precedence(expr)
        return (
            f"{self.parenthesize(expr.lhs, level)} {operator} {self.parenthesize(expr.rhs, level)}"
        )

    def _print_Einsum(self, expr):
        spec, *operands = expr.args
        arguments = ", ".join(self._print(o) for o in operands)
        return f'{self._module_format("numpy.einsum")}("{spec}", {arguments}, optimize=True)'

    def _print_Windows(self, expr):
        array, kernel, stride, dilation = expr.args
        extent = ", ".join(self._print(dilation * (k - 1) + 1) for k in kernel)
        view = self._module_format("numpy.lib.stride_tricks.sliding_window_view")
        text = f"{view}({self._print(array)}, ({extent}), axis=(-2, -1))"
        stride_text, dilation_text = self._print(stride), self._print(dilation)
        steps = [f"::{stride_text}"] * 2 + [f"::{dilation_text}"] * 2
        return f"{text}[..., {', '.join(steps)}]"

    def _print_Col2Im(self, expr):
        self.helpers_used.add("col2im")
        cols, kernel, stride, dilation = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        return (
            f"{HELPERS['col2im']}({self._print(cols)}, {kernel_text}, {self._print(stride)}, "
            f"{self._print(dilation)})"
        )

    def _print_Shifted(self, expr):
        self.helpers_used.add("shifted")
        array, offsets, sizes = expr.args
        offsets_text = "(" + ", ".join(self._print(o) for o in offsets) + ("," if len(offsets) == 1 else "") + ")"
        sizes_text = "(" + ", ".join(self._print(s) for s in sizes) + ("," if len(sizes) == 1 else "") + ")"
        return f"{HELPERS['shifted']}({self._print(array)}, {offsets_text}, {sizes_text})"

    def _print_FirstArgmaxMask(self, expr):
        self.helpers_used.add("first_argmax_mask")
        return f"{HELPERS['first_argmax_mask']}({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        self.helpers_used.add("erf")
        return f"{HELPERS['erf']}({self._print(expr.args[0])})"

    def _print_erfc(self, expr):
        self.helpers_used.add("erfc")
        return f"{HELPERS['erfc']}({self._print(expr.args[0])})"


def float_constants(expr: sp.Expr) -> sp.Expr:
    """Irrational constants (``sqrt(2)/2``, ``pi``) as floats, folded into their coefficients."""
    irrational = {
        a for a in expr.atoms(sp.Pow, sp.NumberSymbol) if a.is_number and not a.is_Rational
    }
    return expr.xreplace({a: a.evalf(17) for a in irrational})


def numpy_code(expr: sp.Expr, printer: SymbpNumPyPrinter | None = None) -> str:
    """NumPy source for one whole-array expression."""
    return (printer or SymbpNumPyPrinter()).doprint(float_constants(expr))
