"""Safe parsing of user expressions such as ``x*tanh(log(1 + exp(x)))``.

The text goes through Python's :mod:`ast` parser and a whitelist of node types; it is never
given to ``eval``, ``sympify`` or ``parse_expr``. Allowed: numbers (kept exact: ``0.01`` becomes
``1/100``), the variable ``x``, the constants ``pi`` and ``e``, ``+ - * / **``, unary minus, and
the functions in :data:`FUNCTIONS`.
"""

from __future__ import annotations

import ast
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
FLOAT64_LIMIT = sp.Integer(2) ** 1024

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
        result = _convert(tree.body, names)
    except RecursionError:
        raise SpecError(f"expression {text!r} is nested too deeply") from None
    if not isinstance(result, sp.Expr) or result.free_symbols - {variable}:
        raise SpecError(f"expression {text!r} must be a number-valued expression in x")
    if result.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise SpecError(f"expression {text!r} is undefined (division by zero?)")
    if any(abs(number) >= FLOAT64_LIMIT for number in result.atoms(sp.Number)) or any(
        not _within_float64(node) for node in sp.preorder_traversal(result) if node.is_number
    ):
        raise SpecError(f"expression {text!r} has a number beyond the float64 range")
    if variable not in result.free_symbols:
        raise SpecError(f"expression {text!r} does not depend on x")
    if sp.diff(result, variable).has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise SpecError(f"expression {text!r} has an undefined derivative (0**x, log(0)?)")
    if any(node.is_number and node.is_real is False for node in sp.preorder_traversal(result)):
        raise SpecError(
            f"expression {text!r} has an imaginary number (a root or log of a negative number?);"
            " activations are real-valued"
        )
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


def _convert(node: ast.AST, names: dict[str, sp.Expr]) -> sp.Expr:
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
        operand = _convert(node.operand, names)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        return _convert_chain(node, names)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise SpecError("'^' is not a power; write x**2")
        operation = _BINARY.get(type(node.op))
        if operation is None:
            raise SpecError(f"operator {type(node.op).__name__} is not allowed")
        left, right = _convert(node.left, names), _convert(node.right, names)
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
        args = [_convert(arg, names) for arg in node.args]
        try:
            return FUNCTIONS[node.func.id](*args)
        except (TypeError, ValueError) as err:
            raise SpecError(f"bad call {ast.unparse(node)}: {err}") from None
    raise SpecError(f"{type(node).__name__} is not allowed in an expression")


def _convert_chain(node: ast.BinOp, names: dict[str, sp.Expr]) -> sp.Expr:
    """A run of ``+ -`` (or of ``* /``) such as ``x + x + ... + x``, built without recursing
    along it: Python's parser nests it a level a term, and a sum is not deep (see _depth)."""
    additive = isinstance(node.op, ast.Add | ast.Sub)
    kinds = (ast.Add, ast.Sub) if additive else (ast.Mult, ast.Div)
    steps = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, kinds):
        steps.append((node.op, node.right))
        node = node.left
    result = _convert(node, names)
    for op, operand in reversed(steps):
        value = _convert(operand, names)
        if isinstance(op, ast.Div) and value == 0:
            raise SpecError("division by zero")
        result = _BINARY[type(op)](result, value)
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


def _within_float64(number: sp.Expr) -> bool:
    """Whether a constant of the expression (``exp(1000)``, not only the literals) has a
    finite float64 value."""
    try:
        value = complex(sp.N(number, 17))
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(value.real) and math.isfinite(value.imag)


def _check_power(base: sp.Expr, exponent: sp.Expr) -> None:
    """Refuse a constant power beyond the float64 range before sympy computes it exactly
    (``9**9**9`` has 370 million digits: sympy would take minutes)."""
    if base.free_symbols or not exponent.is_Number or exponent == 0 or base.is_zero:
        return
    digits = abs(float(exponent)) * abs(float(sp.log(sp.Abs(base), 10).evalf(15)))
    if not digits <= MAX_DIGITS:
        raise SpecError("a number in the expression is beyond the float64 range")
