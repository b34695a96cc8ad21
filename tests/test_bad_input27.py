"""Bad input from issue 27 that used to get through: each is refused at declaration or on the
command line with one line naming the file, the layer and the field (or the option), exit 2."""

from __future__ import annotations

import pytest
import sympy as sp

import symbp
from symbp.cli import main as cli_main
from symbp.declare.expr import parse_expression
from symbp.declare.layers import X
from symbp.declare.net import MAX_NESTING
from symbp.errors import SpecError


def one_line_error(capsys, argv) -> str:
    """Run the command line on ``argv``: it must exit 2 with one line on stderr; that line."""
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("symbp: error: ") and captured.err.count("\n") == 1, captured
    return captured.err


# -- 15: constants that overflow through nested functions ---------------------------------------

E3 = "exp(exp(exp(100)))"  # e**(e**(2.7e43)): about 10**(10**43) digits
NESTED_OVERFLOWS = [
    f"{E3}*x",
    f"x + {E3}",
    f"({E3} - 1)*x",
    f"x/{E3}",
    f"exp(-{E3})*x",
    f"max(x, {E3})",
    f"max({E3}, 1)*x",
    f"min(x, -{E3})",
    f"abs({E3} - 1)*x",
    f"sin({E3})*x",
    f"tanh({E3})*x",
    f"erf({E3})*x",
    f"sqrt({E3})*x",
    f"x**{E3}",
    "sin(exp(exp(100)))*x",  # sin of e**(2.7e43): its argument reduction needs 10**43 digits
    "cos(exp(exp(exp(2))))*x",
    "exp(exp(exp(exp(5))))*x",
]


@pytest.fixture
def no_evalf_of_nested_exp(monkeypatch):
    """Fail where sympy's arbitrary precision is asked for the value of an exp of an exp: that
    is what ran for hours (mpmath computes e**(e**100) to 10**43 digits to take its exp or its
    sine; sympy's own constructors, ``Max`` and ``exp`` among them, ask for it too). Each
    expression above has one, so before the fix each test failed here at once."""
    evalf = sp.core.evalf.EvalfMixin.evalf

    def guarded(self, *args, **kwargs):
        nested = any(
            isinstance(node, sp.exp) and node.args[0].has(sp.exp)
            for node in sp.preorder_traversal(self)
        )
        assert not nested, f"evalf of {self}"
        return evalf(self, *args, **kwargs)

    monkeypatch.setattr(sp.core.evalf.EvalfMixin, "evalf", guarded)


@pytest.mark.parametrize("text", NESTED_OVERFLOWS)
def test_constants_overflowing_through_nested_functions_are_refused(no_evalf_of_nested_exp, text):
    with pytest.raises(SpecError, match="beyond the float64 range"):
        parse_expression(text, variable=X)


@pytest.mark.parametrize("text", ["exp(700)*x", "sin(exp(700))*x", "x*exp(-exp(700))",
                                  "max(x, exp(700))", "x**(10**300)"])
def test_constants_within_float64_are_kept(text):
    # exp(-exp(700)) underflows to 0 in float64, which is a value, not an overflow
    assert parse_expression(text, variable=X).has(X)


def test_derive_expr_with_a_nested_overflow_is_one_line(capsys, no_evalf_of_nested_exp):
    err = one_line_error(capsys, ["derive", "--expr", f"{E3}*x"])
    assert "'--expr'" in err and "float64" in err


def test_codegen_of_a_nested_overflow_is_one_line(capsys, tmp_path, no_evalf_of_nested_exp):
    spec = tmp_path / "over.toml"
    spec.write_text(
        'input = { features = 3 }\n[[layers]]\ntype = "activation"\nname = "act"\n'
        f'expr = "{E3}*x"\n'
    )
    err = one_line_error(capsys, ["codegen", str(spec), "-o", str(tmp_path / "m.py")])
    assert str(spec) in err and "'act'" in err and "'expr'" in err and "float64" in err
    assert not (tmp_path / "m.py").exists()


# -- 16: residual blocks nested deeply -----------------------------------------------------------


def nested_residuals(depth: int) -> str:
    inner = '{ type = "relu" }'
    for _ in range(depth):
        inner = f'{{ type = "residual", layers = [{inner}] }}'
    return f"input = {{ features = 3 }}\nlayers = [{inner}]\n"


def test_residual_blocks_nested_200_deep_are_one_line(capsys, tmp_path):
    # the TOML reader ran out of Python's stack: a RecursionError traceback, exit 1
    spec = tmp_path / "deep.toml"
    spec.write_text(nested_residuals(200))
    err = one_line_error(capsys, ["derive", str(spec)])
    assert str(spec) in err and f"at most {MAX_NESTING} deep" in err


def test_residual_nesting_is_limited_at_declaration(tmp_path):
    assert MAX_NESTING == 16
    symbp.parse_spec(nested_residuals(MAX_NESTING))  # as deep as allowed
    with pytest.raises(SpecError, match=f"at most {MAX_NESTING} deep") as err:
        symbp.parse_spec(nested_residuals(MAX_NESTING + 1))
    assert err.value.field == "layers"
    assert err.value.layer == "_".join(["residual1"] * (MAX_NESTING + 1))
    layer = symbp.relu()
    for _ in range(1000):  # the Python API: refused without recursing 1000 deep
        layer = symbp.residual([layer])
    with pytest.raises(SpecError, match=f"at most {MAX_NESTING} deep"):
        symbp.Net([layer], input_features=3)
