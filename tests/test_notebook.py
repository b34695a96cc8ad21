"""``examples/notebook.ipynb`` runs in a real Jupyter kernel and displays what a notebook can show.

The notebook derives a small network, displays its study notes and plots its gradient flow. It
is executed here with nbclient and an IPython kernel (the ``test`` extra installs them; without
nbclient the test is skipped, saying so). The notes must reach the notebook as ``text/markdown``
(Markdown with ``$$`` math, which MathJax and KaTeX render) and never as ``text/latex``: a
notebook renders that MIME type with MathJax, which shows math only, and the notes' LaTeX is a
document (``\\section*``, ``tabular``) that it would print as text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from render.tools import extract_markdown_math, have_node, katex_errors

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"

# Starting a Jupyter kernel that derives a network takes several seconds: CI runs these
# (python -m pytest -m slow), the default run does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def executed():
    nbclient = pytest.importorskip(
        "nbclient", reason="nbclient missing: pip install -e '.[test]' (nbclient, ipykernel)"
    )
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel starts in the repository root, so that it imports this checkout's symbp
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    with pytest.MonkeyPatch.context() as patch:
        # jupyter_core's own paths, without its warning about the coming change of default
        patch.setenv("JUPYTER_PLATFORM_DIRS", os.environ.get("JUPYTER_PLATFORM_DIRS", "1"))
        client.execute()
    return notebook


def _outputs(notebook):
    return [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_runs_without_errors(executed):
    for outputs in _outputs(executed):
        for output in outputs:
            assert output["output_type"] != "error", output
            assert output.get("name") != "stderr", output.get("text")


def test_notes_display_as_markdown_not_latex(executed):
    shown = [o for outputs in _outputs(executed) for o in outputs if "data" in o]
    notes = [o["data"] for o in shown if "text/markdown" in o["data"]]
    assert len(notes) == 1
    (data,) = notes
    assert "text/latex" not in data
    markdown = data["text/markdown"]
    assert "## Activation derivatives" in markdown and "## Gradient flow" in markdown
    assert r"\section" not in markdown and r"\begin{tabular}" not in markdown
    assert "text/plain" in data and len(data["text/plain"]) < 200
    # any LaTeX output of the notebook is math only (sympy's $\displaystyle ...$), which
    # MathJax shows: no document commands
    for latex in (o["data"]["text/latex"] for o in shown if "text/latex" in o["data"]):
        assert latex.startswith("$") and latex.endswith("$"), latex[:80]
        assert r"\section" not in latex and r"\begin{tabular}" not in latex
    if have_node():
        errors = katex_errors(extract_markdown_math(markdown))
        assert errors == [], errors[:3]


def test_flow_plot_is_an_image(executed):
    images = [
        o["data"]["image/png"]
        for outputs in _outputs(executed)
        for o in outputs
        if "data" in o and "image/png" in o["data"]
    ]
    assert len(images) == 1 and len(images[0]) > 1000


def test_notebook_is_stored_without_outputs():
    import json

    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cells
               if c["cell_type"] == "code")
