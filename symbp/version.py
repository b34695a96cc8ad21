"""The version of symbp, written here and nowhere else.

The package metadata reads it (``pyproject.toml``: ``version = { attr = ... }``), ``symbp``
re-exports it as ``symbp.__version__``, and the generated modules record it in their header.
It imports nothing, so every part of symbp can read it without importing upwards.
"""

__version__ = "0.1.0"
