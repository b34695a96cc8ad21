"""Emission: numpy modules (``module``), LaTeX/Markdown notes (``notes``), terminal text
(``pretty``), and the sympy printers they share."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def template_folder() -> str:
    """The folder of the jinja2 templates: ``templates/`` beside the package when symbp is imported
    from a source checkout (``python -m symbp`` from a clone or a git worktree, whatever checkout an
    editable install recorded), else package ``symbp.templates``, where they ship inside the
    wheel."""
    checkout = Path(__file__).resolve().parents[2] / "templates"
    if (checkout / "module.py.j2").is_file():
        return str(checkout)
    return str(Path(str(importlib.resources.files("symbp.templates"))))
