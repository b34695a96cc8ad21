"""Print whole-array sympy expressions as NumPy code.

A :class:`~sympy.printing.numpy.NumPyPrinter` subclass: the array operations of
:mod:`symbp.derivation.arrays` get their own ``_print_<Class>`` methods, functions are printed with
the ``np.`` prefix, and number-valued constants (``sqrt(2)``, ``pi``) become Python float literals
so that they never turn a float32 computation into float64 (NumPy scalars would, Python floats
don't). The generated module needs NumPy alone; the few functions NumPy lacks (``erf``) are
printed as calls to helpers of :mod:`symbp.runtime` (see :data:`HELPERS`), which the module
builder copies into the module with what they call.
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE, precedence

from .array_shapes import array_shape, is_smaller

#: Functions NumPy lacks: the name printed for each, a function of :mod:`symbp.runtime` (the
#: printer records the names it prints in ``helpers_used``).
HELPERS = {
    key: f"_{key}"
    for key in (
        "erf", "erfc", "col2im", "shifted", "first_argmax_mask", "first_max_col2im", "first_argmax",
        "argmax_col2im", "window_max", "tensordot", "window_tensordot", "col2im_tensordot",
        "row_vector", "sigmoid", "softplus", "along_rows", "scatter_rows",
    )
}


def _is_size(expr: sp.Expr) -> bool:
    """Whether ``expr`` is a positive integer made of sizes alone (``E``, ``H*W``): a Python
    int in the generated code, never an array."""
    return bool(expr.is_integer and expr.is_positive and expr.free_symbols
                and all(not isinstance(a, sp.Indexed) for a in sp.preorder_traversal(expr)))


class RowVector(sp.Function):
    """A vector the generated function computes and then broadcasts along the rows of a bigger
    array (``dx *= gamma*invstd``). It is printed ``_row_vector(v)``, a helper that hands such
    passes the vector in memory they read at full speed (see its docstring); the value is
    ``v``'s, exactly."""

    nargs = 1


class SymbpNumPyPrinter(NumPyPrinter):
    """NumPy code for array expressions, with ``np`` as the module name."""

    printmethod = "_symbp_numpycode"

    def __init__(self, settings=None, shapes: dict[str, tuple] | None = None):
        super().__init__({"fully_qualified_modules": True, **(settings or {})})
        #: The runtime helpers printed code calls (:data:`HELPERS`' values, functions of
        #: :mod:`symbp.runtime`); what they call in turn is the registry's to find.
        self.helpers_used: set[str] = set()
        #: Optional shapes (tuples of sympy sizes) of the array symbols, by name. With them the
        #: printer chooses cheaper NumPy for the same value (see :meth:`_print_Mul` and
        #: :meth:`_print_SumOver`); without them it prints the plain form.
        self.shapes = shapes
        #: Steps printed as NumPy booleans ``(u > 0)``: factors of a product with an array
        #: (see :meth:`_print_Step`).
        self._boolean_steps: frozenset = frozenset()

    def _helper(self, key: str) -> str:
        """The name printed for the helper :data:`HELPERS` lists under key, recorded as used."""
        name = HELPERS[key]
        self.helpers_used.add(name)
        return name

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        return "np." + text[len("numpy.") :] if text.startswith("numpy.") else text

    # -- numbers --------------------------------------------------------------------------------
    def _print_constant(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        # NumPy takes a Python int beyond int64 nowhere (x**10**20 raises OverflowError); as a
        # float it is the number NumPy would compute with anyway.
        if -(2**63) <= expr.p < 2**63:
            return super()._print_Integer(expr)
        return self._print_constant(expr)

    def _print_Pow(self, expr, rational=False):
        if expr.is_number and not expr.is_Rational:
            return self._print_constant(expr)
        if expr.exp in (sp.Rational(1, 2), sp.Rational(-1, 2)) and _is_size(expr.base):
            # a size is a Python int at run time: int**0.5 is a Python float, which keeps a
            # float32 array float32 (np.sqrt(E) is a NumPy float64, which would promote it)
            root = f"{self.parenthesize(expr.base, PRECEDENCE['Pow'])}**0.5"
            return root if expr.exp > 0 else f"1/{root}"
        if expr.exp == sp.Rational(-1, 2):
            return f"1/{self._module_format('numpy.sqrt')}({self._print(expr.base)})"
        if expr.exp == -1:
            return f"1/{self.parenthesize(expr.base, PRECEDENCE['Pow'])}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Mul(self, expr):
        if expr.is_number and not expr.is_Rational:
            return self._print_constant(expr)
        from ..derivation.arrays import Dot

        if expr.as_coeff_Mul()[0].is_negative and any(isinstance(f, Dot) for f in expr.args):
            # sympy prints a negative product at the precedence of a sum, where a matrix
            # product needs no parentheses: ``-a*b @ c`` would be ``(-a*b) @ c``. A bare one
            # is parenthesized: ``-a @ b`` would negate all of ``a`` (a pass over a big
            # array), ``-(a @ b)`` negates the product (the same numbers)
            negated = -expr
            level = PRECEDENCE["Mul"] if isinstance(negated, Dot) else PRECEDENCE["Mul"] - 1
            return f"-{self.parenthesize(negated, level)}"
        steps = frozenset(f for f in expr.args if _is_step(f))
        coefficient, _ = expr.as_coeff_Mul()
        if steps and coefficient == 1 and any(not _is_step(f) for f in expr.args):
            outer, self._boolean_steps = self._boolean_steps, self._boolean_steps | steps
            try:
                return self._print_product(expr)
            finally:
                self._boolean_steps = outer
        return self._print_product(expr)

    def factor_code(self, expr: sp.Expr) -> str:
        """``expr`` printed as the factor that multiplies an array (``np.multiply(dy, expr)``):
        steps that are ``expr`` or its direct factors may be NumPy booleans."""
        steps = frozenset(f for f in sp.Mul.make_args(expr) if _is_step(f))
        if not steps or expr.as_coeff_Mul()[0] != 1:
            return self.doprint(expr)
        outer, self._boolean_steps = self._boolean_steps, self._boolean_steps | steps
        try:
            return self.doprint(expr)
        finally:
            self._boolean_steps = outer

    def _print_product(self, expr):
        split = self._small_and_big(expr)
        if split is not None:
            # Small factors (scalars, per-feature vectors) first, multiplied together, then one
            # pass over the big array: ``gamma*invstd/N*xhat`` rather than a pass per factor.
            small, big = split
            if self._is_row_product(expr):
                return self.row_pass("multiply", big, small)
            letters = self._along_last_axes(small, big)
            if letters is not None:
                return self._einsum_product(small, big, *letters)
            level = PRECEDENCE["Mul"]
            # A printed product reads left to right (``g*k/N*X`` is ``((g*k)/N)*X``), so the
            # small product needs no parentheses; anything else does.
            head = self._print(small) if small.is_Mul else self.parenthesize(small, level)
            return f"{head}*{self.parenthesize(big, level)}"
        return super()._print_Mul(expr)

    def _as_ordered_terms(self, expr, order=None):
        terms = super()._as_ordered_terms(expr, order=order)
        if self.shapes is None or not isinstance(expr, sp.Add):
            return terms
        shape = array_shape(expr, self.shapes)
        if shape is None:
            return terms
        # Big terms first: ``big - small`` updates the big temporary in place, whereas
        # ``small - big`` needs a new array.
        return sorted(terms, key=lambda term: is_smaller(term, shape, self.shapes))

    def _small_and_big(self, expr: sp.Mul):
        """``(small, big)`` factors of a product whose shape is known, or None."""
        if self.shapes is None:
            return None
        shape = array_shape(expr, self.shapes)
        if shape is None or sum(d != 1 for d in shape) < 2:
            return None  # a pass over a vector costs little: keep sympy's order
        small, big = [], []
        for factor in expr.args:
            (small if is_smaller(factor, shape, self.shapes) else big).append(factor)
        if not big or not small or small == [sp.S.NegativeOne]:
            return None
        if len(small) == 1 and small[0].is_Number:
            return None
        return sp.Mul(*small), sp.Mul(*big)

    def _along_last_axes(self, small: sp.Expr, big: sp.Expr) -> tuple[str, str] | None:
        """einsum letters of ``small`` and ``big`` when ``small`` is constant along the last
        axes of ``big`` (a column ``v[:, None]``, a per-channel ``g[:, None, None]``): NumPy's
        ``multiply`` broadcasts such an operand in short inner loops, ``np.einsum`` took
        0.49-0.93x its time for the same numbers (docs/speed.md, *The canon layers*)."""
        from ..derivation.arrays import Step

        shape, own = array_shape(big, self.shapes), array_shape(small, self.shapes)
        if shape is None or own is None or not own or len(own) > len(shape) or (
                big.has(Step) or small.has(Step)):
            return None
        if len(shape) < 2 or own[-1] != 1 or shape[-1] == 1 or all(d == 1 for d in own):
            return None
        letters = "abcdefghijklmnopqrstuvwxyz"[: len(shape)]
        return letters[len(shape) - len(own):], letters

    def _einsum_product(self, small: sp.Expr, big: sp.Expr, first: str, second: str) -> str:
        call = self._module_format("numpy.einsum")
        return f'{call}("{first},{second}->{second}", {self._print(small)}, {self._print(big)})'

    def _is_row_product(self, expr: sp.Expr) -> bool:
        """Whether ``expr`` is a product printed as one ``_along_rows`` call."""
        split = self._small_and_big(expr) if isinstance(expr, sp.Mul) else None
        return split is not None and self.is_row_of(*split)

    def is_row_of(self, vector: sp.Expr, array: sp.Expr) -> bool:
        """Whether ``vector`` is as long as the rows of the 2-D ``array`` (shapes known) and is
        broadcast along them: a pass :meth:`row_pass` prints."""
        if self.shapes is None:
            return False
        shape = array_shape(array, self.shapes)
        if shape is None or len(shape) != 2 or shape[1] == 1:
            return False
        return array_shape(vector, self.shapes) == (shape[1],)

    def row_pass(self, ufunc: str, first: sp.Expr, second: sp.Expr, out: str | None = None):
        """``_along_rows(np.<ufunc>, first, second, out=out)``: one operand a 2-D array, the
        other a vector broadcast along its rows (the helper hands NumPy long rows; the value
        is ``np.<ufunc>(first, second)``'s). The vector is read as it is: the helper copies it
        anyway, so a :class:`RowVector` around it is dropped."""
        args = [
            self._module_format("numpy." + ufunc),
            *(self._print(a.replace(RowVector, lambda v: v)) for a in (first, second)),
        ]
        if out is not None:
            args.append(f"out={out}")
        return f"{self._helper('along_rows')}({', '.join(args)})"

    def _print_Float(self, expr):
        # The double nearest the value, in the shortest form that reads back as that double.
        return repr(float(expr))

    def _print_NumberSymbol(self, expr):
        return self._print_constant(expr)

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Function(self, expr):
        if expr.is_number:
            return self._print_constant(expr)
        return super()._print_Function(expr)

    def parenthesize(self, item, level, strict=False):
        # Python gives ``@`` the precedence of ``*``: a matrix product inside a product or a
        # power needs its parentheses (``C*(A @ B)``, not ``C*A @ B`` = ``(C*A) @ B``).
        from ..derivation.arrays import Dot

        if isinstance(item, Dot) and level >= PRECEDENCE["Mul"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

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
        if self._is_row_product(array):  # one call: ``_along_rows(...).sum(axis=0)``
            text = self._print(array)
        else:
            text = self.parenthesize(array, PRECEDENCE["Atom"], strict=True)
        return f"{text}.{method}(axis={axis})"

    def _print_SumOver(self, expr):
        fused = self._fused_sum(expr)
        return fused if fused is not None else self._reduction(expr, "sum")

    def _fused_sum(self, expr):
        """Sums that NumPy computes faster another way, when the operands' shapes are known.

        ``sum(a*b)`` of two arrays of one shape is ``np.einsum`` (no product array in memory);
        the sum over the first axis of one 2-D array is a BLAS matrix-vector product with ones:
        ``a.sum(axis=0)`` took 1.1-1.9x its time (float64) and 1.2-3.2x (float32) on shapes
        (64, 256) to (4096, 256), one BLAS thread (issue 23's measurement), so that spelling
        stays.
        """
        if self.shapes is None:
            return None
        array, axes = expr.args
        axes = tuple(int(a) for a in axes)
        coefficient, rest = array.as_coeff_Mul()
        factors = list(sp.Mul.make_args(rest))
        if len(factors) == 1 and factors[0].is_Pow and factors[0].exp == 2:
            factors = [factors[0].base] * 2
        if not all(
            isinstance(f, sp.Symbol) and self.shapes.get(f.name) is not None for f in factors
        ):
            return None
        shapes = {self.shapes[f.name] for f in factors}
        if len(shapes) != 1:
            return None
        (shape,) = shapes
        if len(factors) == 1 and coefficient == 1 and len(shape) == 2 and axes == (0,):
            (a,) = factors
            ones, matmul = self._module_format("numpy.ones"), self._module_format("numpy.matmul")
            return f"{matmul}({ones}({a}.shape[0], {a}.dtype), {a})"
        if len(factors) != 2 or not 0 < len(shape) <= 26:
            return None
        letters = "ijklmnopqrstuvwxyzabcdefgh"[: len(shape)]
        kept = "".join(letter for k, letter in enumerate(letters) if k not in axes)
        call = (
            f'{self._module_format("numpy.einsum")}("{letters},{letters}->{kept}", '
            f"{factors[0]}, {factors[1]})"
        )
        if coefficient != 1:
            return f"{self._print(coefficient)}*{call}"
        return call

    def _print_MaxOver(self, expr):
        return self._reduction(expr, "max")

    def _print_NewAxis(self, expr):
        return self._sliced(expr, "None")

    def _print_Flipped(self, expr):
        return self._sliced(expr, "::-1")

    def _sliced(self, expr, mark):
        """``a[:, mark, ...]``: ``mark`` at the positions ``expr`` lists, ``:`` before them."""
        array, positions = expr.args
        positions = {int(p) for p in positions}
        slots = [mark if p in positions else ":" for p in range(max(positions) + 1)]
        return f"{self.parenthesize(array, PRECEDENCE['Atom'], strict=True)}[{', '.join(slots)}]"

    def _print_Sigmoid(self, expr):
        # 1/(1 + exp(-u)) by a helper that neither overflows nor loses relative accuracy.
        return f"{self._helper('sigmoid')}({self._print(expr.args[0])})"

    def _print_Softplus(self, expr):
        # log(1 + exp(u)) by a helper that neither overflows nor loses relative accuracy.
        return f"{self._helper('softplus')}({self._print(expr.args[0])})"

    def _print_Step(self, expr):
        # ``(u > 0)``, a boolean array, is the fastest form, but only right where NumPy turns
        # it into numbers at once: as a factor of a product with an array (``dy*(y > 0)``).
        # Booleans add as "or" and cannot be negated, and a number times a boolean array is an
        # int64 or float64 array whatever the dtype of the rest; anywhere else it is
        # ``np.heaviside(u, 0)``, in u's dtype.
        u, *at_zero = expr.args
        if expr in self._boolean_steps:
            return f"({self._print(u)} > 0)"
        value = repr(float(at_zero[0])) if at_zero else "0"
        return f"{self._module_format('numpy.heaviside')}({self._print(u)}, {value})"

    def _print_Max(self, expr):
        return self._pairwise("numpy.maximum", expr.args)

    def _print_Min(self, expr):
        return self._pairwise("numpy.minimum", expr.args)

    def _pairwise(self, function: str, args) -> str:
        """``np.maximum(a, np.maximum(b, c))`` for ``Max(a, b, c)`` (sympy flattens nested
        ones; its own printer's ``functools.reduce`` needed an import the module lacks),
        arrays first, numbers last (``np.maximum(x, 0)``)."""
        first, *rest = sorted(args, key=lambda a: a.is_number)
        second = rest[0] if len(rest) == 1 else None
        inner = self._print(second) if second is not None else self._pairwise(function, rest)
        return f"{self._module_format(function)}({self._print(first)}, {inner})"

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
        """``np.einsum``; with ``optimize=True`` (BLAS through tensordot) only for a real
        contraction: where both operands carry the same indices (an element-wise product
        summed, batch norm's ``sum(dy*xhat)`` over ``(N, H, W)``), einsum's own loop reads
        each array once, and its optimized path took 6.4 ms against 0.65 ms on a
        ``(64, 64, 32, 32)`` float32 pair (see docs/speed.md)."""
        spec, *operands = expr.args
        arguments = ", ".join(self._print(o) for o in operands)
        inputs = str(spec).split("->")[0].split(",")
        optimize = "" if len(set(inputs)) == 1 else ", optimize=True"
        return f'{self._module_format("numpy.einsum")}("{spec}", {arguments}{optimize})'

    def _print_TensorDot(self, expr):
        a, b, axes_a, axes_b, order = expr.args
        text = (
            f"{self._helper('tensordot')}({self._print(a)}, {self._print(b)}, "
            f"{self._print_tuple(tuple(axes_a))}, {self._print_tuple(tuple(axes_b))})"
        )
        return text + self._transposed(order)

    def _print_WindowTensorDot(self, expr):
        a, x, kernel, stride, dilation, axes_a, axes_windows, order = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        text = (
            f"{self._helper('window_tensordot')}({self._print(a)}, {self._print(x)}, "
            f"{kernel_text}, {self._print(stride)}, {self._print(dilation)}, "
            f"{self._print_tuple(tuple(axes_a))}, {self._print_tuple(tuple(axes_windows))})"
        )
        return text + self._transposed(order)

    def _print_Col2ImTensorDot(self, expr):
        a, b, axes_a, axes_b, order, kernel, stride, dilation = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        return (
            f"{self._helper('col2im_tensordot')}({self._print(a)}, {self._print(b)}, "
            f"{self._print_tuple(tuple(axes_a))}, {self._print_tuple(tuple(axes_b))}, "
            f"{self._print_tuple(tuple(order))}, {kernel_text}, {self._print(stride)}, "
            f"{self._print(dilation)})"
        )

    @staticmethod
    def _transposed(order) -> str:
        """``.transpose(...)`` for a product's axis order, or nothing for the identity."""
        if list(order) == list(range(len(order))):
            return ""
        return f".transpose({', '.join(str(k) for k in order)})"

    def _print_Windows(self, expr):
        array, kernel, stride, dilation = expr.args
        extent = ", ".join(self._print(dilation * (k - 1) + 1) for k in kernel)
        view = self._module_format("numpy.lib.stride_tricks.sliding_window_view")
        text = f"{view}({self._print(array)}, ({extent}), axis=(-2, -1))"
        if stride == 1 and dilation == 1:
            return text
        steps = [f"::{self._print(stride)}" if stride != 1 else ":"] * 2
        if dilation != 1:
            steps += [f"::{self._print(dilation)}"] * 2
        else:
            steps += [":"] * 2  # the window axes are last
        return f"{text}[..., {', '.join(steps)}]"

    def _print_Col2Im(self, expr):
        cols, kernel, stride, dilation = expr.args
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        return (
            f"{self._helper('col2im')}({self._print(cols)}, {kernel_text}, {self._print(stride)}, "
            f"{self._print(dilation)})"
        )

    def _print_Shifted(self, expr):
        array, offsets, sizes = expr.args
        return (
            f"{self._helper('shifted')}({self._print(array)}, {self._print_tuple(tuple(offsets))}, "
            f"{self._print_tuple(tuple(sizes))})"
        )

    def _print_WindowMaximum(self, expr):  # or a WindowArgmaxIndex: the first_argmax's position
        helper = "window_max" if type(expr).__name__ == "WindowMaximum" else "first_argmax"
        return f"{self._helper(helper)}({', '.join(self._print(a) for a in expr.args)})"

    _print_WindowArgmaxIndex = _print_WindowMaximum

    def _print_FirstArgmaxMask(self, expr):
        return f"{self._helper('first_argmax_mask')}({self._print(expr.args[0])})"

    def _print_FirstMaxCol2Im(self, expr):
        # windows (or ArgmaxCol2Im: the kept arg-max positions), g, kernel, stride, dilation
        source, g, kernel, stride, dilation = expr.args
        helper = "first_max_col2im" if type(expr).__name__ == "FirstMaxCol2Im" else "argmax_col2im"
        kernel_text = f"({', '.join(self._print(k) for k in kernel)})"
        return (
            f"{self._helper(helper)}({self._print(source)}, {self._print(g)}, "
            f"{kernel_text}, {self._print(stride)}, {self._print(dilation)})"
        )

    _print_ArgmaxCol2Im = _print_FirstMaxCol2Im

    def _print_RowVector(self, expr):
        return f"{self._helper('row_vector')}({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"{self._helper('erf')}({self._print(expr.args[0])})"

    def _print_erfc(self, expr):
        return f"{self._helper('erfc')}({self._print(expr.args[0])})"

    _print_Erfc = _print_erfc


def accurate_forms(expr: sp.Expr) -> sp.Expr:
    """``c*exp(u) - c`` as ``c*expm1(u)`` and ``log(1 + u)`` as ``log1p(u)``: the same values,
    computed without the cancellation that loses ``u``'s digits where ``u`` is small (ELU's
    ``alpha*(exp(x) - 1)`` just below 0), and in one pass instead of two."""

    def minus_one(node):  # c*exp(u) - c, c a number (sympy spreads 2*(exp(u) - 1) so)
        constant, terms = node.as_coeff_Add()
        for term in sp.Add.make_args(terms):
            c, rest = term.as_coeff_Mul()
            if isinstance(rest, sp.exp) and constant != 0 and c == -constant:
                others = [t for t in sp.Add.make_args(terms) if t is not term]
                return sp.Add(c * expm1(rest.args[0]), *others)
        return node

    def one_plus(node):
        inner = node.args[0]
        if not (isinstance(inner, sp.Add) and sp.S.One in inner.args):
            return node
        return log1p(inner - 1)

    expr = expr.replace(lambda node: isinstance(node, sp.Add), minus_one)
    return expr.replace(lambda node: isinstance(node, sp.log), one_plus)


def float_constants(expr: sp.Expr) -> sp.Expr:
    """Irrational constants (``sqrt(2)/2``, ``pi``, ``sin(2)``, ``log(10**30)``) as floats,
    folded into their coefficients.

    A constant left as a call would be printed ``np.sin(2)``: a float64 NumPy scalar, which
    makes a float32 array float64, and ``np.log(10**30)`` fails on an int beyond int64.
    """
    irrational = {
        a for a in expr.atoms(sp.Pow, sp.NumberSymbol) if a.is_number and not a.is_Rational
    }
    irrational |= {
        f for f in expr.atoms(sp.Function) if f.is_number and not f.has(sp.Symbol, sp.Indexed)
    }
    values = {a: a.evalf(40) for a in irrational}
    return expr.xreplace({a: v for a, v in values.items() if v.is_Float or v.is_Number})


def numpy_code(expr: sp.Expr, printer: SymbpNumPyPrinter | None = None) -> str:
    """NumPy source for one whole-array expression."""
    return (printer or SymbpNumPyPrinter()).doprint(accurate_forms(float_constants(expr)))


def _is_step(factor: sp.Expr) -> bool:
    from ..derivation.arrays import Step

    return isinstance(factor, Step) and len(factor.args) == 1  # 0 at 0: a boolean (u > 0)
