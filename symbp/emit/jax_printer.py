"""Print whole-array sympy expressions as JAX (``jax.numpy``) code.

:class:`SymbpJaxPrinter` derives from the NumPy printer
(:class:`~symbp.emit.numpy_printer.SymbpNumPyPrinter`): the same lowered expressions, the same
choices of form, printed with ``jnp.`` in place of ``np.``. JAX arrays are immutable, so nothing
is printed in place: no ``out=``, NumPy's memory helpers (``_along_rows``, ``_row_vector``) become
the plain operations they compute, and a scatter-add is ``.at[ids].add(rows)``. The functions
NumPy lacks are JAX's own (``jax.nn.sigmoid``, ``jax.nn.softplus``, ``jax.scipy.special.erf``).

The generated module copies the few helpers printed code calls from :data:`HELPER_SOURCES`.
An array operation this printer does not print yet (convolution windows, pooling) raises
:class:`JaxPrintError` naming it.
"""

from __future__ import annotations

from sympy.printing.precedence import PRECEDENCE

from .numpy_printer import SymbpNumPyPrinter

#: Helper functions the printed code may call (copied into the module when used).
HELPER_SOURCES = {
    "_scatter_rows": '''def _scatter_rows(rows, ids, count):
    """The (count, ...) array whose row v is the sum of the rows of ``rows`` at id v."""
    zeros = jnp.zeros((count, *rows.shape[ids.ndim:]), rows.dtype)
    return zeros.at[ids].add(rows)
''',
}

#: NumPy printer helper -> what this printer prints instead (a JAX function or a helper above)
_FUNCTIONS = {
    "sigmoid": "jax.nn.sigmoid",
    "softplus": "jax.nn.softplus",
    "erf": "jax.scipy.special.erf",
    "erfc": "jax.scipy.special.erfc",
    "scatter_rows": "_scatter_rows",
}


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
        raise JaxPrintError("the jax target cannot print convolution windows yet")

    def _print_WindowTensorDot(self, expr):
        raise JaxPrintError("the jax target cannot print convolution windows yet")
