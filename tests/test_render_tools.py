"""Tests of the render-check tools themselves (tests/render/), with known-good and
known-bad inputs that do not come from symbp, so that a passing render test of an
export means something."""

from __future__ import annotations

import subprocess

import pytest
from render.tools import (
    KATEX_SCRIPT,
    RENDER_DIR,
    bitmap_fonts,
    compile_latex,
    extract_markdown_math,
    have_node,
    have_pdflatex,
    katex_errors,
    latex_errors,
    overfull_boxes,
)

needs_node = pytest.mark.skipif(not have_node(), reason="node is not installed")
needs_pdflatex = pytest.mark.skipif(not have_pdflatex(), reason="pdflatex is not installed")


# --------------------------------------------------------------------------- Markdown math


def test_extract_inline_and_display():
    md = "Let $x_i$ be given.\n\n$$\ny = \\frac{a}{b}\n$$\n\nand $z$.\n"
    assert extract_markdown_math(md) == [("x_i", False), ("y = \\frac{a}{b}", True), ("z", False)]


def test_extract_multiline_display_and_same_line_display():
    md = "$$\n\\begin{aligned}\na &= b \\\\\nc &= d\n\\end{aligned}\n$$\ntext $$e = mc^2$$ text\n"
    assert extract_markdown_math(md) == [
        ("\\begin{aligned}\na &= b \\\\\nc &= d\n\\end{aligned}", True),
        ("e = mc^2", True),
    ]


def test_extract_ignores_code_spans_and_fences():
    md = (
        "Code `$not math$` and ``a ` $no$ ``, then $yes$.\n"
        "```python\nx = '$also not$'\n$$\n```\n"
        "~~~~\n$nor this$\n~~~~\n"
        "- item\n  ```\n  $indented fence$\n  ```\n"
        "end $\\alpha$\n"
    )
    assert extract_markdown_math(md) == [("yes", False), ("\\alpha", False)]


def test_extract_math_fence_is_display_math():
    md = "Before $a$.\n\n```math\n\\sum_i x_i\n```\n\nAfter $b$.\n"
    assert extract_markdown_math(md) == [("a", False), ("\\sum_i x_i", True), ("b", False)]


def test_extract_unmatched_backticks_are_text():
    assert extract_markdown_math("a ` b $c$") == [("c", False)]


def test_extract_escaped_dollars():
    md = "Price \\$5 and \\$10, but $p \\$ q$ is math; \\\\$r$ too."
    assert extract_markdown_math(md) == [("p \\$ q", False), ("r", False)]


def test_extract_currency_is_not_math():
    # opening $ followed by space, closing $ preceded by space or followed by digit
    assert extract_markdown_math("costs $5 or $10 today") == []
    assert extract_markdown_math("a $ b$ c") == []
    assert extract_markdown_math("a $b $ c") == []
    assert extract_markdown_math("from $a$ to $b$2") == [("a", False)]


def test_extract_inline_math_does_not_cross_blank_line():
    assert extract_markdown_math("a $b\n\nc$ d") == []
    assert extract_markdown_math("a $b\nc$ d") == [("b\nc", False)]


def test_extract_display_backslash_does_not_close():
    assert extract_markdown_math("$$a \\\\$$") == [("a \\\\", True)]
    assert extract_markdown_math("$$a \\$$$") == [("a \\$", True)]


def test_extract_unclosed_display_math():
    md = "Text\n\n$$\nx = 1\n\nmore text\n"
    with pytest.raises(ValueError, match=r"unclosed \$\$"):
        extract_markdown_math(md)
    assert extract_markdown_math(md, strict=False) == []
    with pytest.raises(ValueError, match="unclosed ```math"):
        extract_markdown_math("```math\nx\n")


def test_extract_crlf():
    assert extract_markdown_math("$$\r\nx\r\n$$\r\n") == [("x", True)]


# --------------------------------------------------------------------------- KaTeX


def test_katex_errors_empty_input_needs_no_node():
    assert katex_errors([]) == []


@needs_node
def test_katex_good_inputs_parse():
    blocks = [
        ("\\frac{a}{b}", False),
        ("\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}", True),
        ("\\frac{\\partial L}{\\partial W} = \\delta\\, x^{\\top}", True),
        ("\\operatorname{diag}(\\sigma'(z)) \\odot \\mathbf{W}", False),
        ("\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}", False),
    ]
    assert katex_errors(blocks) == []


@needs_node
def test_katex_bad_inputs_fail():
    blocks = [
        ("\\frac{a}{b}", False),
        ("\\frac{a}", False),
        ("\\foo", False),
        ("x^{", True),
        ("\\left( x", False),
        ("\\begin{align} a &= b \\end{align}", False),  # align needs display mode
    ]
    errors = katex_errors(blocks)
    assert len(errors) == 5
    assert errors[0].startswith("[1] inline '\\\\frac{a}'")
    assert "Undefined control sequence: \\foo" in errors[1]
    assert errors[2].startswith("[3] display")
    assert "display mode" in errors[4]


@needs_node
def test_katex_bare_strings_are_inline():
    assert katex_errors(["a+b", "\\sqrt{x}"]) == []
    assert len(katex_errors(["\\sqrt{"])) == 1


@needs_node
def test_katex_strict_rejects_latex_incompatible_input():
    blocks = [("é", False), ("x % comment", False), ("\\begin{array}{c} a & b \\end{array}", False)]
    errors = katex_errors(blocks)
    assert len(errors) == 3
    assert all("strict mode" in e for e in errors)
    assert katex_errors(blocks, strict="ignore") == []


@needs_node
def test_katex_untrusted_commands_are_errors():
    errors = katex_errors([("\\href{https://example.org}{x}", False)])
    assert len(errors) == 1 and "untrusted" in errors[0]


@needs_node
def test_katex_macros_do_not_leak_between_blocks():
    blocks = [("\\newcommand{\\myvec}{\\mathbf{v}} \\myvec", False), ("\\myvec", False)]
    errors = katex_errors(blocks)
    assert len(errors) == 1 and errors[0].startswith("[1]")


@needs_node
def test_katex_markdown_end_to_end():
    good = "The loss $L = \\tfrac12\\|y - \\hat y\\|^2$ has\n$$\n\\nabla_y L = y - \\hat y\n$$\n"
    bad = "Broken $\\frac{1}$ here and `$\\ignored{$` in code.\n"
    assert katex_errors(extract_markdown_math(good)) == []
    assert len(katex_errors(extract_markdown_math(bad))) == 1


@needs_node
def test_katex_script_rejects_malformed_input():
    proc = subprocess.run(
        ["node", str(KATEX_SCRIPT)], input='{"tex": "x"}', capture_output=True, text=True
    )
    assert proc.returncode == 2 and "JSON array" in proc.stderr


# --------------------------------------------------------------------------- LaTeX

PREAMBLE = (
    "\\documentclass{article}\n"
    "\\usepackage[T1]{fontenc}\n"
    "\\usepackage{lmodern}\n"
    "\\usepackage{amsmath,amssymb,bm}\n"
)


def _doc(body: str) -> str:
    return PREAMBLE + "\\begin{document}\n" + body + "\n\\end{document}\n"


@needs_pdflatex
def test_latex_minimal_document_compiles(tmp_path):
    tex = _doc(
        "Gradient $\\frac{\\partial L}{\\partial W} = \\delta x^\\top$.\n"
        "\\begin{align}\n a &= \\bm{b} \\\\ c &= \\mathbb{R}^n\n\\end{align}"
    )
    ok, log, pdf = compile_latex(tex, tmp_path)
    assert ok, latex_errors(log) or log[-2000:]
    assert pdf is not None and pdf.read_bytes().startswith(b"%PDF")
    assert latex_errors(log) == []
    assert overfull_boxes(log) == []
    assert bitmap_fonts(log) == []  # T1 + lmodern: Type 1 fonts only


@needs_pdflatex
def test_latex_undefined_macro_fails(tmp_path):
    ok, log, pdf = compile_latex(_doc("Hello $\\undefinedmacro{x}$."), tmp_path)
    assert not ok
    assert pdf is None
    errors = latex_errors(log)
    assert errors and "Undefined control sequence" in errors[0]
    assert "l.6" in errors[0]


@needs_pdflatex
def test_latex_unicode_in_math_fails(tmp_path):
    ok, log, _ = compile_latex(_doc("$\u03b1 + 1$"), tmp_path)
    assert not ok
    assert any("Unicode character" in e for e in latex_errors(log))


@needs_pdflatex
def test_latex_cross_references_resolved_by_rerun(tmp_path):
    tex = _doc("\\begin{equation}\\label{eq:a} x = 1 \\end{equation}\nSee \\eqref{eq:a}.")
    ok, log, _ = compile_latex(tex, tmp_path)
    assert ok
    assert "undefined references" not in log
    assert "Rerun to get" not in log


@needs_pdflatex
def test_latex_overfull_box_detected(tmp_path):
    ok, log, _ = compile_latex(_doc("\\[ " + "x + " * 120 + "y \\]"), tmp_path)
    assert ok  # overfull boxes are warnings, not errors
    boxes = overfull_boxes(log)
    assert len(boxes) == 1
    assert boxes[0].startswith("Overfull \\hbox (") and "pt too wide" in boxes[0]
    assert overfull_boxes(log, min_pt=1e6) == []


def test_overfull_boxes_parses_log_text():
    log = (
        "Overfull \\hbox (179.04184pt too wide) detected at line 6\n"
        "\\OML/lmm/m/it/10 a\n"
        "Underfull \\hbox (badness 10000) in paragraph at lines 1--2\n"
        "Overfull \\hbox (0.5pt too wide) in paragraph at lines 6--10\n"
        "Overfull \\vbox (3.0pt too high) has occurred while \\output is active\n"
    )
    assert overfull_boxes(log) == [
        "Overfull \\hbox (179.04184pt too wide) detected at line 6",
        "Overfull \\hbox (0.5pt too wide) in paragraph at lines 6--10",
    ]
    assert overfull_boxes(log, min_pt=1.0) == [
        "Overfull \\hbox (179.04184pt too wide) detected at line 6"
    ]


def test_latex_errors_and_bitmap_fonts_parse_log_text():
    log = (
        "! Undefined control sequence.\n"
        "l.6 Hello $\\undefinedmacro\n"
        "{x}$.\n"
        " </root/.texlive2022/texmf-var/fonts/pk/ljfour/jknappen/ec/ecrm1000.600pk>"
        "</usr/share/texlive/texmf-dist/fonts/type1/public/amsfonts/cm/cmmi10.pfb>\n"
    )
    assert latex_errors(log) == ["! Undefined control sequence. [l.6 Hello $\\undefinedmacro]"]
    assert bitmap_fonts(log) == ["ecrm1000.600pk"]


def test_render_dir_layout():
    for name in ("katex_check.js", "package.json", "package-lock.json"):
        assert (RENDER_DIR / name).is_file()
