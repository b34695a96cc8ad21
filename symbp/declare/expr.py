"""Safe parsing of user expressions such as ``x*tanh(log(1 + exp(x)))``.

The text goes through Python's :mod:`ast` parser and a whitelist of node types; it is never
given to ``eval``, ``sympify`` or ``parse_expr``. Allowed: numbers (kept exact: ``0.01`` becomes
``1/100``), the variable ``x``, the constants ``pi`` and ``e``, ``+ - * / **``, unary minus, and
the functions in :data:`FUNCTIONS`.
"""

from __future__ import annotations

import ast
import cmath
import math
from collections.abc import Callable

import sympy as sp

from ..errors import SpecError

#: The functions a user expression may call, by the name it uses.
FUNCTIONS: dict[str, Callable[..., sp.Expr]] = {
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "tanh": sp.tanh,
    "sinh": sp.sinh,
    "cosh": sp.cosh,
    "sin": sp.sin,
    "cos": sp.cos,
    "atan": sp.atan,
    "asinh": sp.asinh,
    "erf": sp.erf,
    "erfc": sp.erfc,
    "abs": sp.Abs,
    "max": sp.Max,
    "min": sp.Min,
}
#: The functions that take more than one argument; every other one takes exactly one.
VARIADIC = frozenset({"max", "min"})
CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "e": sp.E}
MAX_LENGTH = 2000
#: The deepest nesting of function calls and powers an expression may have: sympy's derivation
#: recurses through it, and its time grows fast with depth (8 nested tanh: 4 s, 10: 57 s;
#: 150 nested exp ran out of Python's stack).
MAX_DEPTH = 8
#: Numbers must stay within float64: the largest power of ten a constant may reach.
MAX_DIGITS = 308

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def parse_expression(text: object, *, variable: sp.Symbol) -> sp.Expr:
    """Parse ``text`` into a sympy expression in ``variable`` (named ``x`` in the text).

    Raises :class:`SpecError` with a one-line reason for anything outside the whitelist.
    """
    if not isinstance(text, str):
        raise SpecError(f"expression must be a string, got {type(text).__name__}")
    if not text.strip():
        raise SpecError("expression is empty")
    if len(text) > MAX_LENGTH:
        raise SpecError(f"expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise SpecError(f"expression {text!r} is not valid syntax: {err.msg}") from None
    if _depth(tree.body) > MAX_DEPTH:
        raise SpecError(f"expression nests functions and powers more than {MAX_DEPTH} deep")
    names = {variable.name: variable, **CONSTANTS}
    try:
        return _checked(text, tree, names, variable)
    except RecursionError:
        raise SpecError(f"expression {text!r} is nested too deeply") from None
    except (ArithmeticError, ValueError) as err:  # sympy's or mpmath's own limits
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if len(reason) > 100:
            reason = reason[:97] + "..."
        raise SpecError(
            f"expression {text!r} has a constant that sympy cannot evaluate ({reason})"
        ) from None


def _checked(text: str, tree: ast.Expression, names: dict, variable: sp.Symbol) -> sp.Expr:
    """The expression of ``tree``, once it has passed every check (see parse_expression)."""
    result = _convert(tree.body, names, _Floats())
    if not isinstance(result, sp.Expr) or result.free_symbols - {variable}:
        raise SpecError(f"expression {text!r} must be a number-valued expression in x")
    if result.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise SpecError(f"expression {text!r} is undefined (division by zero?)")
    if variable not in result.free_symbols:
        raise SpecError(f"expression {text!r} does not depend on x")
    if any(node.is_number and node.is_real is False for node in sp.preorder_traversal(result)):
        raise SpecError(
            f"expression {text!r} has an imaginary number (a root or log of a negative number?);"
            " activations are real-valued"
        )
    if sp.diff(result, variable).has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise SpecError(f"expression {text!r} has an undefined derivative (0**x, log(0)?)")
    if not any(_real_at(result, variable, point) for point in SAMPLE_POINTS):
        points = ", ".join(str(point) for point in SAMPLE_POINTS)
        raise SpecError(
            f"expression {text!r} has no real value at any of x = {points} (a root or log of"
            " a negative number, a negative number to the power x?); activations are real-valued"
        )
    return result


#: Where an expression must be real at least once: spread over the range activations see, and
#: not integers, where (-2)**x happens to be real although it is not anywhere in between.
SAMPLE_POINTS = (-3.7, -1.3, -0.41, 0.29, 0.83, 1.9, 4.6)


def _real_at(expr: sp.Expr, variable: sp.Symbol, point: float) -> bool:
    """Whether ``expr`` is real at ``variable = point``: computed in floats as the generated
    code computes it, every intermediate real (``abs(sqrt(-1 - x**2))`` is NaN in NumPy, not a
    magnitude). A value beyond float64 counts as real (overflow is not what this asks); one
    undefined there (``log(0)``) does not. Not in sympy's arbitrary precision: seven nested
    ``exp`` there have hundreds of millions of digits and ran for minutes."""
    try:
        value = _real_value(expr, variable, point)
    except OverflowError:
        return True
    except (ValueError, ZeroDivisionError):
        return False
    return not math.isnan(value)


_REAL_FUNCTIONS = {
    sp.exp: math.exp,
    sp.log: math.log,
    sp.tanh: math.tanh,
    sp.sinh: math.sinh,
    sp.cosh: math.cosh,
    sp.sin: math.sin,
    sp.cos: math.cos,
    sp.atan: math.atan,
    sp.asinh: math.asinh,
    sp.erf: math.erf,
    sp.erfc: math.erfc,
    sp.Abs: abs,
    sp.Max: max,
    sp.Min: min,
}


def _real_value(expr: sp.Expr, variable: sp.Symbol, point: float) -> float:
    """``expr`` at ``variable = point`` over the whitelist of :data:`FUNCTIONS`, in floats;
    ValueError where a step leaves the reals (``math.log(-1)``, ``(-2.0)**0.37``)."""
    if expr == variable:
        return point
    if expr.is_number and not expr.args or isinstance(expr, sp.NumberSymbol):
        return float(expr)
    args = [_real_value(arg, variable, point) for arg in expr.args]
    if expr.is_Add:
        return math.fsum(args)
    if expr.is_Mul:
        return math.prod(args)
    if expr.is_Pow:
        value = args[0] ** args[1]
    elif type(expr) in _REAL_FUNCTIONS:
        value = _REAL_FUNCTIONS[type(expr)](*args)
    else:  # a form sympy made of the whitelist
        value = complex(expr.subs(variable, point))
    if isinstance(value, complex):
        raise ValueError("not real")
    return float(value)


def _convert(node: ast.AST, names: dict[str, sp.Expr], floats: _Floats) -> sp.Expr:
    """The sympy expression of ``node``, each part's constants checked as it is built (see
    :class:`_Floats`)."""
    return floats.check(_convert_node(node, names, floats))


def _convert_node(node: ast.AST, names: dict[str, sp.Expr], floats: _Floats) -> sp.Expr:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"only numbers are allowed as constants, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError("a number in the expression is beyond the float64 range")
        return sp.Integer(value) if isinstance(value, int) else sp.Rational(repr(value))
    if isinstance(node, ast.Name):
        if node.id not in names:
            allowed = ", ".join(sorted(names))
            raise SpecError(f"unknown name {node.id!r} (allowed: {allowed})")
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _convert(node.operand, names, floats)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        return _convert_chain(node, names, floats)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise SpecError("'^' is not a power; write x**2")
        operation = _BINARY.get(type(node.op))
        if operation is None:
            raise SpecError(f"operator {type(node.op).__name__} is not allowed")
        left, right = _convert(node.left, names, floats), _convert(node.right, names, floats)
        if isinstance(node.op, ast.Div) and right == 0:
            raise SpecError("division by zero")
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return operation(left, right)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            func = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            allowed = ", ".join(sorted(FUNCTIONS))
            raise SpecError(f"function {func!r} is not allowed (allowed: {allowed})")
        if node.keywords or not node.args:
            raise SpecError(f"{node.func.id}() takes positional arguments only")
        if node.func.id not in VARIADIC and len(node.args) != 1:
            # sqrt(x, 2) would pass the 2 on to sympy's evaluate flag, silently
            raise SpecError(f"{node.func.id}() takes one argument, got {len(node.args)}")
        args = [_convert(arg, names, floats) for arg in node.args]
        try:
            return FUNCTIONS[node.func.id](*args)
        except (TypeError, ValueError) as err:
            raise SpecError(f"bad call {ast.unparse(node)}: {err}") from None
    raise SpecError(f"{type(node).__name__} is not allowed in an expression")


def _convert_chain(node: ast.BinOp, names: dict[str, sp.Expr], floats: _Floats) -> sp.Expr:
    """A run of ``+ -`` (or of ``* /``) such as ``x + x + ... + x``, built without recursing
    along it: Python's parser nests it a level a term, and a sum is not deep (see _depth)."""
    additive = isinstance(node.op, ast.Add | ast.Sub)
    kinds = (ast.Add, ast.Sub) if additive else (ast.Mult, ast.Div)
    steps = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, kinds):
        steps.append((node.op, node.right))
        node = node.left
    result = _convert(node, names, floats)
    for op, operand in reversed(steps):
        value = _convert(operand, names, floats)
        if isinstance(op, ast.Div) and value == 0:
            raise SpecError("division by zero")
        result = floats.check(_BINARY[type(op)](result, value))
    return result


def _depth(node: ast.AST) -> int:
    """How deeply ``node``'s function calls and powers nest (sums and products flatten in
    sympy, so a long sum is not deep); without recursing: the input may be deep."""
    deepest, pending = 0, [(node, 0)]
    while pending:
        current, level = pending.pop()
        if isinstance(current, ast.Call) or (
            isinstance(current, ast.BinOp) and isinstance(current.op, ast.Pow)
        ):
            level += 1
        deepest = max(deepest, level)
        pending.extend((child, level) for child in ast.iter_child_nodes(current))
    return deepest


class _Floats:
    """The value in complex floats of every constant part of an expression (``exp(1000)``, not
    only the literals), each step checked to stay within float64's range.

    Computed bottom-up, each node once (memoized across calls), never in sympy's arbitrary
    precision: ``exp(exp(exp(100)))`` there needs about 10**43 digits and ran for hours, and
    sympy's constructors evaluate constants too (``Max``, ``Abs`` and ``exp`` compare their
    arguments with numbers). The parser checks each node as it builds it, so that no sympy
    function is ever given a constant beyond float64: whatever the expression's shape, sympy
    then works at a precision of at most about a thousand digits.
    """

    NOT_CONSTANT = object()

    def __init__(self) -> None:
        self.values: dict[sp.Basic, object] = {}

    def check(self, expr: sp.Basic) -> sp.Basic:
        """``expr``, once every constant part of it has a finite, non-zero (unless exactly 0)
        float64 value; a SpecError where one has not. Too small counts as much as too large:
        sympy's exact work on ``exp(-exp(700))`` (rounding it, taking it modulo pi) computes
        powers of ten of 10**304 digits."""
        pending = [expr]
        while pending:
            node = pending[-1]
            if node in self.values:
                pending.pop()
                continue
            missing = [arg for arg in node.args if arg not in self.values]
            if missing:
                pending.extend(missing)
                continue
            pending.pop()
            self.values[node] = self._value(node)
        return expr

    def _value(self, node: sp.Basic) -> object:
        """``node``'s value from its arguments' values: NOT_CONSTANT or a finite complex."""
        if isinstance(node, sp.Symbol) or not isinstance(node, sp.Expr):
            return self.NOT_CONSTANT
        args = [self.values[arg] for arg in node.args]
        if any(arg is self.NOT_CONSTANT for arg in args):
            return self.NOT_CONSTANT
        if node.is_Mul:
            _check_log_coefficient(node)
        if node.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise SpecError("a number in the expression is undefined (division by zero?)")
        try:
            value = _complex_value(node, args)
        except (OverflowError, ValueError, ZeroDivisionError):
            value = None
        if value is None or not (math.isfinite(value.real) and math.isfinite(value.imag)):
            raise SpecError("a number in the expression is beyond the float64 range")
        if value == 0 and node != 0:  # exactly 0 is sympy's S.Zero; anything else underflowed
            raise SpecError(
                "a number in the expression is beyond the float64 range (so small it is 0)"
            )
        return value


_COMPLEX_FUNCTIONS = {
    sp.exp: cmath.exp,
    sp.log: cmath.log,
    sp.tanh: cmath.tanh,
    sp.sinh: cmath.sinh,
    sp.cosh: cmath.cosh,
    sp.sin: cmath.sin,
    sp.cos: cmath.cos,
    sp.atan: cmath.atan,
    sp.asinh: cmath.asinh,
    sp.Abs: abs,
}


def _complex_value(node: sp.Expr, args: list[complex]) -> complex:
    """The value of the constant ``node`` in complex floats from its arguments' values (an
    OverflowError or an infinity beyond float64's range; a SpecError for what is not
    computed from the whitelist in floats)."""
    if not node.args:
        if node.is_Rational:  # exact: 10**400 overflows, 10**-400 underflows to 0
            return complex(int(node.p) / int(node.q))
        return complex(node)  # pi, E, I, a Float
    if node.is_Add:
        return complex(math.fsum(a.real for a in args), math.fsum(a.imag for a in args))
    if node.is_Mul:
        return math.prod(args, start=complex(1))
    if node.is_Pow:
        base, exponent = args
        return base**exponent
    if type(node) in _COMPLEX_FUNCTIONS:
        return complex(_COMPLEX_FUNCTIONS[type(node)](*args))
    if all(arg.imag == 0 for arg in args):
        reals = [arg.real for arg in args]
        if isinstance(node, sp.erf):
            return complex(math.erf(*reals))
        if isinstance(node, sp.erfc):
            return complex(math.erfc(*reals))
        if isinstance(node, sp.Max):
            return complex(max(reals))
        if isinstance(node, sp.Min):
            return complex(min(reals))
    elif isinstance(node, sp.erf | sp.erfc):
        raise SpecError(
            "a number in the expression is imaginary (a root or log of a negative number?);"
            " activations are real-valued"
        )
    raise SpecError(f"the number {node} in the expression cannot be computed in float64")


def _digits(number: int) -> str:
    return f"10**{len(str(number)) - 1}" if number >= 10**6 else str(number)


#: The largest denominator of an exponent of a number: ``2**(1/q)`` is an algebraic number of
#: degree q, and where sympy cannot settle a question about one by evaluating it (is
#: ``2**(1/10**300) - 1`` positive?) it computes its minimal polynomial, of degree q.
MAX_ROOT = 10**15


def _check_log_coefficient(product: sp.Expr) -> None:
    """Refuse ``r*log(c)`` with a number ``c`` whose power ``c**r`` sympy cannot compute:
    sympy's ``exp`` combines the logs of its argument (``10**30*log(2)`` into
    ``log(2**(10**30))``, computed exactly: it hung)."""
    coefficient, rest = product.as_coeff_Mul()
    if not coefficient.is_Rational or coefficient in (1, -1):
        return
    for factor in sp.Mul.make_args(rest):
        if isinstance(factor, sp.log) and not factor.args[0].free_symbols:
            _check_power(factor.args[0], coefficient, " (r*log(c) is log(c**r) to sympy)")


def _check_power(base: sp.Expr, exponent: sp.Expr, note: str = "") -> None:
    """Refuse a constant power beyond the float64 range before sympy computes it exactly
    (``9**9**9`` has 370 million digits: sympy would take minutes); also the power of a
    product's number, which sympy takes out of a power: ``(2*x)**(10**300)`` computes
    ``2**(10**300)``."""
    if exponent.is_Add and not base.free_symbols:  # c**(r - pi) is c**r*c**(-pi) to sympy
        for term in exponent.args:
            if term.is_Rational:
                _check_power(base, term)
    if not exponent.is_Number or exponent == 0:
        return
    if base.free_symbols:
        base = base.as_coeff_Mul()[0]
    if base.is_zero or base in (1, -1):
        return
    if exponent.is_Rational and exponent.q > MAX_ROOT and not base.free_symbols:
        raise SpecError(
            f"a number in the expression is a root of degree {_digits(exponent.q)} of {base}"
            f"{note}, more than sympy can work with"
        )
    magnitude = abs(complex(base.evalf(15)))  # within float64: the parser checked it so
    digits = abs(float(exponent)) * abs(math.log10(magnitude)) if magnitude else 0.0
    if not digits <= MAX_DIGITS:
        raise SpecError("a number in the expression is beyond the float64 range")
