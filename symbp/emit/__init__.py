"""Emission: numpy modules (``module``), LaTeX/Markdown notes (``notes``), terminal text
(``pretty``), and the sympy printers they share."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def template_folder() -> str:
    """The folder of the jinja2 templates: package ``symbp.templates`` once installed (they ship
    inside the wheel), else ``templates/`` beside the package in a source checkout (``python -m
    symbp`` run from a clone, or an editable install whose recorded path has moved)."""
    try:
        folder = Path(str(importlib.resources.files("symbp.templates")))
    except ModuleNotFoundError:
        folder = None
    if folder is None or not folder.is_dir():
        folder = Path(__file__).resolve().parents[2] / "templates"
    return str(folder)
