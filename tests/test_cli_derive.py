"""``symbp derive``: what it prints for a spec, one layer and one expression, its exit codes, and
``python -m symbp``."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest
import sympy as sp

from symbp import cli
from symbp.declare.layers import Activation
from symbp.declare.spec import load_spec
from symbp.derivation.layer import derive_layer
from symbp.derivation.verify import Verdict
from symbp.emit import pretty
from symbp.emit.module import generate_module

ROOT = Path(__file__).resolve().parent.parent
MLP_BN = str(ROOT / "examples" / "mlp_bn.toml")
MISH = "x*tanh(log(1 + exp(x)))"
MLP_BN_LAYERS = ["fc1", "bn1", "relu3", "res1", "res1_linear1", "mish", "out"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sections(text: str) -> dict[str, str]:
    """The output split at its ``== NAME: ...`` headings, keyed by NAME."""
    parts = re.split(r"^== ", text, flags=re.MULTILINE)
    return {re.split(r"[:\s]", part, maxsplit=1)[0]: part for part in parts[1:]}


def test_derive_spec_prints_every_layer(capsys):
    code, out, err = run(capsys, "derive", MLP_BN)
    assert code == 0 and err == ""
    assert out.startswith("network mlp_bn: input [784] per sample, loss softmax_cross_entropy")
    found = sections(out)
    assert [name for name in found if name not in ("loss", "backward")] == MLP_BN_LAYERS
    for name in MLP_BN_LAYERS:
        section = found[name]
        assert "  forward:" in section, name
        assert re.search(r"^  backward \(given d\w+\):", section, re.MULTILINE), name
        assert "  backward reads from the forward pass: " in section, name
    assert "  backward (the loss is the output):" in found["loss"]


def test_derive_spec_shows_whole_array_formulas(capsys):
    _, out, _ = run(capsys, "derive", MLP_BN)
    fc1 = sections(out)["fc1"]
    for line in ("z = b + x @ W", "dx = dz @ W.T", "dW = x.T @ dz", "db = dz.sum(axis=0)"):
        assert f"\n    {line}\n" in fc1
    assert "backward reads from the forward pass: x, W" in fc1
    relu = sections(out)["relu3"]
    assert "backward reads from the forward pass: y" in relu


def test_derive_spec_shows_the_backward_order(capsys):
    """The order the generated backward runs: the reverse of the forward pass, a residual
    block's own step (handing dy to its skip and its body) before its body, and the two
    gradients of the block's input summed once both are there."""
    _, out, _ = run(capsys, "derive", MLP_BN)
    order = out.split("== backward order", 1)[1].splitlines()[1:]
    names = [line.split(":")[0].strip() for line in order]
    assert names == ["out", "res1", "mish", "res1_linear1", "sum", "relu3", "bn1", "fc1"]
    assert "  sum: drelu3 = drelu3@res1 + drelu3@res1_linear1" in order
    # ... the order the generated module's backward runs them in
    source = generate_module(load_spec(MLP_BN))
    backward = source.split("\ndef backward(", 1)[1].split("\ndef ", 1)[0]
    steps = ["residual_add_backward(", "mish_backward(", "dh = dskip_res1 + dh", "relu_backward("]
    positions = [backward.index(step) for step in steps]
    assert positions == sorted(positions)


def test_derive_one_layer(capsys):
    code, out, err = run(capsys, "derive", MLP_BN, "--layer", "bn1")
    assert code == 0 and err == ""
    assert list(sections(out)) == ["bn1"]
    assert not out.startswith("network")
    assert "backward, staged chain rule" in out  # staged
    assert "backward (given dy):" in out  # compact
    compact = out.split("backward (given dy):", 1)[1]
    dx_line = next(line for line in compact.splitlines() if line.strip().startswith("dx = "))
    for piece in ("gamma*invstd", "N*dy", "dy.sum(axis=0)", "xhat*(dy*xhat).sum(axis=0)"):
        assert piece in dx_line
    assert "backward reads from the forward pass: gamma, invstd, xhat" in out


def test_derive_one_layer_inside_a_residual_block(capsys):
    code, out, _ = run(capsys, "derive", MLP_BN, "--layer", "mish")
    assert code == 0
    assert list(sections(out)) == ["mish"]


def test_derive_expression_with_verify(capsys):
    code, out, err = run(capsys, "derive", "--expr", MISH, "--verify")
    assert code == 0 and err == ""
    assert out.startswith(f"== activation {MISH}")
    verdicts = [line for line in out.splitlines() if line.strip().startswith("verify ")]
    assert verdicts
    assert all("proven equal to direct differentiation" in line for line in verdicts)
    assert "FAILED" not in out


def test_ascii_output_is_ascii(capsys):
    code, out, _ = run(capsys, "derive", MLP_BN, "--layer", "bn1", "--ascii")
    assert code == 0
    assert out.isascii()


SMALL_SPEC = """
name = "small"
input = { features = 3 }
loss = "mse"

[[layers]]
type = "linear"
name = "fc1"
out = 2

[[layers]]
type = "batchnorm"
name = "bn1"

[[layers]]
type = "sigmoid"
name = "act1"

[[layers]]
type = "residual"
name = "res1"
layers = [
    { type = "linear", out = 2 },
    { type = "activation", name = "swish", expr = "x/(1 + exp(-x))" },
]
"""


def test_verify_on_a_small_spec_passes(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_SPEC, encoding="utf-8")
    code, out, err = run(capsys, "derive", str(path), "--verify")
    assert code == 0, out
    assert err == ""
    verdicts = [line for line in out.splitlines() if line.strip().startswith("verify ")]
    proven = [line for line in verdicts if "proven equal to direct differentiation" in line]
    assert verdicts and proven == verdicts
    for name in ("dW", "db", "dgamma", "dbeta", "dx", "dz"):
        assert any(line.strip().startswith(f"verify {name} ") for line in verdicts), name
    assert any("(staged," in line for line in verdicts)  # batch norm's staged chain too


def test_failed_proof_exits_1(monkeypatch, capsys):
    """Exit code 1 means a proof failed (here: a verifier that refutes everything)."""

    def refute(derivation, sizes, *, staged=False, progress=None):
        return [Verdict("d" + a.name, {}, False, "refuted") for a in derivation.form.differentiable]

    monkeypatch.setattr(pretty, "verify_layer", refute)
    code, out, _ = run(capsys, "derive", "--expr", "tanh(x)", "--verify")
    assert code == 1
    assert "FAILED" in out


def test_python_dash_m_symbp():
    result = subprocess.run(
        [sys.executable, "-m", "symbp", "derive", "--expr", "tanh(x)", "--ascii"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("== activation tanh(x)")
    assert "\n    dx = " in result.stdout
    assert "backward reads from the forward pass: y" in result.stdout
    assert result.stderr == ""


def test_python_dash_m_symbp_on_a_spec():
    result = subprocess.run(
        [sys.executable, "-m", "symbp", "derive", MLP_BN, "--layer", "fc1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "dx = dz @ W.T" in result.stdout


@pytest.mark.skipif(shutil.which("symbp") is None, reason="the symbp script is not installed")
def test_console_script():
    result = subprocess.run(
        ["symbp", "derive", "--expr", "max(0, x)"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "== activation max(0, x)" in result.stdout


# -- bad input: exit 2, one line on stderr naming the field, nothing on stdout ----------------
BAD_EXPRESSIONS = {
    "code": ("__import__('os').system('echo pwned')", "is not allowed"),
    "attribute": ("x.__class__", "Attribute is not allowed"),
    "unknown_name": ("y*x", "unknown name 'y'"),
    "overflow": ("1e400*x", "beyond the float64 range"),
    "huge_power": ("9**9**9*x", "beyond the float64 range"),
    "constant": ("2 + 3", "does not depend on x"),
    "empty": ("", "empty"),
}


@pytest.mark.parametrize(("text", "words"), BAD_EXPRESSIONS.values(), ids=BAD_EXPRESSIONS.keys())
def test_bad_expression_exits_2_with_one_line(capsys, text, words):
    code, out, err = run(capsys, "derive", "--expr", text)
    assert code == 2 and out == ""
    assert err.startswith("symbp: error: field '--expr': ") and err.count("\n") == 1
    assert words in err


def test_bad_expression_in_a_real_process_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    result = subprocess.run(
        [sys.executable, "-m", "symbp", "derive", "--expr",
         f"__import__('os').system('touch {marker}')"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("symbp: error: field '--expr': function ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not marker.exists()


def test_layer_and_spec_errors_name_the_file(tmp_path, capsys):
    spec = tmp_path / "net.toml"
    spec.write_text(SMALL_SPEC.replace('name = "act1"', 'name = "act1"\nslope = 2'),
                    encoding="utf-8")
    code, out, err = run(capsys, "derive", str(spec))
    assert (code, out) == (2, "")
    assert err == (f"symbp: error: {spec}: layer 'act1', field 'slope': unknown field for "
                   "sigmoid (allowed: inputs, name, share)\n")


# -- terminal width: every line fits, and the pieces join back to the unwrapped text -----------
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def _width(line: str) -> int:
    return sum(1 for char in line if not unicodedata.combining(char))


def _unbreakable(line: str) -> bool:
    """The documented exception: one word with no space and no opening bracket in it."""
    word = line.strip()
    return " " not in word and not any(bracket in word[:-1] for bracket in "([{")


@cache
def _blocks(example: Path):
    return list(pretty.derivation_blocks(load_spec(str(example))).blocks())


# each run derives the whole example again: the wider terminal with -m slow (CI)
@pytest.mark.parametrize("width", [80, pytest.param(120, marks=pytest.mark.slow)])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_line_fits_the_terminal_width(monkeypatch, capsys, example, width):
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = run(capsys, "derive", str(example))
    assert code == 0 and err == ""
    too_wide = [line for line in out.splitlines() if _width(line) > width]
    assert all(_unbreakable(line) for line in too_wide), too_wide
    # What the command printed is the report's blocks wrapped to that width.
    wrapped = [line for block in _blocks(example) for line in pretty.render(block, width)]
    assert out.splitlines() == wrapped


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_wrapped_pieces_join_back_to_the_unwrapped_text(example, width):
    for block in _blocks(example):
        unwrapped = pretty.render(block, None)
        pieces = pretty.wrap(block, width)
        if pieces[0].linear and len(unwrapped) > 1:
            # A picture too wide to cut is shown as its one-line form, wrapped as text.
            unwrapped = [block.linear]
        assert pretty.join(pieces, block) == [line.rstrip() for line in unwrapped]


def test_the_widest_formulas_are_cut_between_terms_not_through_them(monkeypatch, capsys):
    """Batch norm's staged dmu on images is three terms; at 80 columns each continuation
    starts with the sign that joins it (a ``+`` or ``-`` at the continuation indent)."""
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = run(capsys, "derive", str(ROOT / "examples" / "cnn_bn.toml"), "--layer", "bn1")
    staged = out.split("backward, staged chain rule", 1)[1].split("backward (given dy)", 1)[0]
    starts = [line[8:10] for line in staged.splitlines() if re.match(r"^        [+-] ", line)]
    assert len(starts) >= 3


def test_the_mish_derivative_is_printed_in_a_smaller_equal_form():
    """The derived ``dx`` of mish is an expanded sum of three terms; what is printed is the
    textbook grouping ``tanh(s) + x*e**x*(1 - tanh(s)**2)/(1 + e**x)`` (times dy), proved equal
    to it and with fewer operations; checked here against sympy's own derivative of the
    forward formula."""
    derivation = derive_layer(Activation(MISH).forward_form((1,)))
    derived = derivation.vjp["x"].expr
    shown = pretty.simplest_form(derived)
    assert sp.count_ops(shown) < sp.count_ops(derived)
    (x_element,) = derivation.form.stages[-1].expr.atoms(sp.Indexed) & {
        e for e in derived.atoms(sp.Indexed) if e.base.name == "x"
    }
    (dy_element,) = {e for e in derived.atoms(sp.Indexed) if e.base.name == "dy"}
    t = sp.Symbol("t", real=True)
    textbook = sp.diff(t * sp.tanh(sp.log(1 + sp.exp(t))), t)
    for value in (-3, -0.5, 0.25, 2):
        got = shown.xreplace({x_element: value, dy_element: 1}).evalf(30)
        assert abs(got - textbook.subs(t, value).evalf(30)) < 1e-25
    # ... and it is the form ``symbp derive`` prints.
    text = pretty.expression_blocks(Activation(MISH)).text(None)
    lhs = derivation.vjp["x"].lhs
    def picture(expr):
        return "\n".join(row.rstrip() for row in pretty._pretty(lhs, expr, True).rows)

    assert picture(shown) in text and picture(derived) not in text


def test_verify_prints_each_verdict_as_it_is_proved(monkeypatch, tmp_path):
    """A layer's verdicts reach stdout before the next layer's proof starts."""
    path = tmp_path / "small.toml"
    path.write_text(SMALL_SPEC, encoding="utf-8")
    out = io.StringIO()
    seen = []
    proved = pretty.verify_layer

    def recording(derivation, sizes, **kwargs):
        seen.append(out.getvalue().count("  verify "))
        return proved(derivation, sizes, **kwargs)

    monkeypatch.setattr(pretty, "verify_layer", recording)
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["derive", str(path), "--verify"]) == 0
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] > 0
    assert len(set(seen)) > 3  # verdicts were written between the proofs, not all at the end


def test_a_long_proof_reports_progress_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(pretty.Progress, "after", 0.0)
    monkeypatch.setattr(pretty.Progress, "every", 0.0)
    code, out, err = run(capsys, "derive", "--expr", "tanh(x)", "--verify")
    assert code == 0 and "proven equal" in out
    lines = err.splitlines()
    assert lines and all(line.startswith("symbp: proving dx (compact, N=2, F=2): element ")
                         for line in lines)


@pytest.mark.parametrize("example", ["mlp_bn", "cnn_bn"])
def test_ascii_output_fits_too(monkeypatch, capsys, example):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "derive", str(ROOT / "examples" / f"{example}.toml"), "--ascii")
    assert code == 0 and out.isascii()
    assert max(len(line) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("power", [18, 500, 123456789])
def test_simplest_form_leaves_high_powers_as_derived(monkeypatch, power):
    """Issue 27, item 15: ``derive --expr "(min(x, 1) + max(x, 2))**5000"`` ran for minutes in
    sympy's simplify, which expands powers. Above budget.MAX_POWER no transform is tried (a
    call to any of them fails this test) and the derivative is shown as derived."""
    x = sp.Symbol("x")
    derived = sp.Symbol("dy") * sp.diff((sp.Min(x, 1) + sp.Max(x, 2)) ** power, x)

    def refused(*args, **kwargs):
        raise AssertionError("a simplification was tried on a high power")

    for name in ("simplify", "factor", "together", "factor_terms"):
        monkeypatch.setattr(pretty.sp, name, refused)
    assert pretty.simplest_form(derived) == derived
    monkeypatch.undo()
    low = sp.Symbol("dy") * sp.diff((x + 1) ** 2 * x, x)  # small powers are still simplified
    assert sp.count_ops(pretty.simplest_form(low)) <= sp.count_ops(low)


def test_derive_expr_with_a_huge_power_of_min_ends(capsys):
    assert cli.main(["derive", "--expr", "(min(x, 1) + max(x, 2))**5000"]) in (0, None)
    out = capsys.readouterr().out
    assert "**4999" in out  # the derived power, shown as the engine derived it
