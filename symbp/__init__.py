"""symbp: derive backpropagation exactly with sympy, generate readable numpy, export notes.

Declare a network (Python or TOML), derive every gradient by the chain rule as exact formulas,
generate a NumPy module, check it against finite differences, export LaTeX/Markdown notes.
"""

__version__ = "0.1.0"
