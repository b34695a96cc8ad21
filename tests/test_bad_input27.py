"""Bad input from issue 27 that used to get through: each is refused at declaration or on the
command line with one line naming the file, the layer and the field (or the option), exit 2."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest
import sympy as sp

import symbp
from symbp.cli import _memory_error
from symbp.cli import main as cli_main
from symbp.declare.expr import parse_expression
from symbp.declare.layers import X
from symbp.declare.net import MAX_NESTING
from symbp.declare.spec import MAX_SPEC_BYTES
from symbp.errors import SpecError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BCE = str(EXAMPLES / "bce.toml")
CNN_BN = str(EXAMPLES / "cnn_bn.toml")


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


@pytest.mark.parametrize("text", ["exp(700)*x", "sin(exp(700))*x", "x*exp(-700)",
                                  "max(x, exp(700))", "x**(10**300)", "x*1e-320"])
def test_constants_within_float64_are_kept(text):
    assert parse_expression(text, variable=X).has(X)


@pytest.mark.parametrize("text", ["x*exp(-exp(700))", "x*exp(-1000)", "x*10**-300*10**-300",
                                  "sinh(e*exp((-700)**pi)) + x", "x*erfc(-10**300)",
                                  "log((10**300)**(abs(erfc(sinh(700)))))"])
def test_constants_too_small_for_float64_are_refused(text):
    # not 0 but below float64's smallest number: sympy's exact work on them (is sinh of one
    # real? it takes the imaginary part modulo pi) computed powers of ten of millions of digits;
    # mpmath's erfc of 10**300 (erfc(-a) is 2 - erfc(a)) raised an OverflowError
    with pytest.raises(SpecError, match="beyond the float64 range \\(so small it is 0\\)"):
        parse_expression(text, variable=X)


def test_the_number_of_a_product_is_not_raised_to_a_huge_power_exactly(monkeypatch):
    # sympy takes the number out of a power: (2*x)**(10**300) computed 2**(10**300) exactly
    power = sp.Integer._eval_power

    def guarded(self, exponent):
        assert abs(exponent) < 10**6, f"{self}**{exponent} computed exactly"
        return power(self, exponent)

    monkeypatch.setattr(sp.Integer, "_eval_power", guarded)
    for text in ["(2*x)**(10**300)", "(x/3)**(10**300)", "(exp(700)/(erf(x)*10))**(10**300)"]:
        with pytest.raises(SpecError, match="beyond the float64 range"):
            parse_expression(text, variable=X)


@pytest.fixture
def no_huge_exact_work(monkeypatch):
    """Fail where sympy computes a power of an integer with an exponent of more than a million
    or a root of degree more than a million exactly, or the minimal polynomial of a number (of
    degree 10**300 here): what hung."""
    power = sp.Integer._eval_power

    def guarded_power(self, exponent):
        assert abs(exponent) < 10**6, f"{self}**{exponent} computed exactly"
        assert not exponent.is_Rational or exponent.q < 10**6, f"{self}**{exponent} computed"
        return power(self, exponent)

    def no_minimal_polynomial(number, *args, **kwargs):
        raise AssertionError(f"minimal polynomial of {number}")

    monkeypatch.setattr(sp.Integer, "_eval_power", guarded_power)
    monkeypatch.setattr(sp.polys.numberfields, "minimal_polynomial", no_minimal_polynomial)


@pytest.mark.parametrize(
    "text, words",
    [
        # sympy's exp combines r*log(c) in its argument into log(c**r): 2**(10**30) computed
        # exactly, or 2**(1/10**300), whose sign sympy settles by its minimal polynomial
        ("exp(1e30*log(2) + x)", "beyond the float64 range"),
        ("erfc(x - (10**30*log(2))**x)", "beyond the float64 range"),
        ("erfc(x - (1e-300*log(2))**x)", "root of degree 10**300 of 2"),
        ("x*300**(1e-300) + sqrt(x)", "root of degree 10**300 of 300"),
        ("(-1)**(1e-300)*x", "imaginary"),
        ("min(max((-702)**(2e-300 - pi)/(cos(702) + 700), 2), x)", "root of degree 10**299"),
    ],
)
def test_numbers_sympy_would_compute_exactly_at_any_cost_are_refused(no_huge_exact_work, text,
                                                                      words):
    with pytest.raises(SpecError, match=re.escape(words)):
        parse_expression(text, variable=X)


def test_roots_of_a_reasonable_degree_are_kept():
    assert parse_expression("x*2**0.123456789", variable=X).has(X)  # degree 10**9
    assert parse_expression("x*log(2)*1e-20", variable=X).has(X)  # x keeps log(2) apart


@pytest.mark.parametrize(
    "text",
    [
        # sympy's Max asks whether the difference is real: sin(10**300)**(-e) has a complex
        # part to it (a ValueError out of sympy's comparison)
        "max(x*10**300 - sin(10**300)**(-e), 1)",
        "min(tanh(x**(10**300) - sqrt(-1)/0.5), 1)",  # sympy's Heaviside of a complex number
    ],
)
def test_what_sympy_itself_cannot_evaluate_is_one_line(text):
    with pytest.raises(SpecError, match="^expression .*(sympy cannot evaluate|imaginary)"):
        parse_expression(text, variable=X)


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


# -- 17, 18: sizes nobody can allocate -----------------------------------------------------------

LINEAR3 = 'input = { features = 3 }\n[[layers]]\ntype = "linear"\n'
CONV = 'input = { shape = [1, 4, 4] }\n[[layers]]\ntype = "conv2d"\nkernel = 3\n'
TOO_BIG = {
    "out 10**12": (LINEAR3 + "out = 1000000000000", "linear1", "out"),
    "out 2**63 - 1": (LINEAR3 + "out = 9223372036854775807", "linear1", "out"),
    "out beyond 64 bits": (LINEAR3 + "out = 1" + "0" * 30, "linear1", "out"),
    "W of 3e9": (LINEAR3.replace("3", "3000") + "out = 1000000", "linear1", "out"),
    "out_channels 10**12": (CONV + "out_channels = 1000000000000", "conv2d1", "out_channels"),
    "conv W of 9e9": (CONV + "out_channels = 1000000000", "conv2d1", "out_channels"),
    "padding 10**9": (CONV + "out_channels = 2\npadding = 1000000000", "conv2d1", "padding"),
    "input 10**18": ('input = { shape = [1, 1000000000, 1000000000] }\n[[layers]]\n'
                     'type = "flatten"', None, "input"),
    "alpha beyond 64 bits": (LINEAR3.replace("linear", "elu") + "alpha = 1" + "0" * 30, "elu1",
                             "alpha"),
}


@pytest.mark.parametrize("text, layer, field", TOO_BIG.values(), ids=TOO_BIG.keys())
def test_sizes_nobody_can_allocate_are_refused_at_declaration(text, layer, field):
    with pytest.raises(SpecError) as err:
        symbp.parse_spec(text)
    assert (err.value.layer, err.value.field) == (layer, field)
    assert "2**31" in err.value.message or "64-bit" in err.value.message


def test_an_integer_of_5000_digits_is_one_line(capsys, tmp_path):
    # Python refuses to read it ("Exceeds the limit (4300 digits)"): a ValueError traceback
    spec = tmp_path / "huge.toml"
    spec.write_text(LINEAR3 + "out = 1" + "0" * 5000)
    err = one_line_error(capsys, ["derive", str(spec)])
    assert str(spec) in err and "64-bit" in err and "set_int_max_str_digits" not in err


def test_check_of_a_padding_of_a_billion_is_one_line(capsys, tmp_path):
    # numpy's "array is too big" traceback, exit 1, when the module padded its input
    spec = tmp_path / "pad.toml"
    spec.write_text(CONV + "out_channels = 2\npadding = 1000000000")
    err = one_line_error(capsys, ["check", str(spec)])
    assert str(spec) in err and "'conv2d1'" in err and "'padding'" in err


def test_the_size_limits_are_2_to_the_31():
    # the limits themselves, at and past the edge: parameters per layer, output per sample
    symbp.Net([symbp.linear(2**31)], input_features=1)  # W (1, 2**31)
    symbp.Net([symbp.linear(2**30)], input_features=2)  # W (2, 2**30)
    symbp.Net([symbp.flatten()], input_shape=(2, 2**15, 2**15))
    for make in (
        lambda: symbp.linear(2**31 + 1),
        lambda: symbp.Net([symbp.linear(2**30)], input_features=3),
        lambda: symbp.Net([symbp.flatten()], input_shape=(3, 2**15, 2**15)),
        lambda: symbp.Net([symbp.conv2d(2, 1, padding=2**15)], input_shape=(1, 1, 1)),
    ):
        with pytest.raises(SpecError, match="2\\*\\*31"):
            make()


# -- 19: memory errors name the file, the option and the layer; the spec is a bounded file -------

HUGE = "100000000000000"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["check", BCE, "--batch", HUGE], "--batch"),
        (["flow", BCE, "--grad-batch", HUGE], "--grad-batch"),
        (["flow", BCE, "--batch", f"1,{HUGE}"], "--batch"),
    ],
    ids=["check", "flow grad", "flow memory table"],
)
def test_a_batch_too_big_for_memory_names_the_file_and_option(capsys, argv, option):
    err = one_line_error(capsys, argv)
    where = f"{BCE}: field '{option}': not enough memory for the input x"
    assert err.startswith(f"symbp: error: {where}")


def test_a_memory_error_names_the_layer_whose_array_it_is():
    # NumPy's message gives the shape; the layer is the one whose array has it
    net = symbp.load_spec(CNN_BN)
    args = argparse.Namespace(command="check", spec=CNN_BN, batch=10**9)
    first = net.placed[0]
    shape = ", ".join(str(d) for d in (10**9, *first.out_shape))
    err = _memory_error(MemoryError(f"Unable to allocate 1 PiB for an array with shape ({shape}) "
                                    "and data type float64"), args)
    assert (err.file, err.layer, err.field) == (CNN_BN, first.name, "--batch")
    assert "its output" in err.message
    weight = first.layer.param_shapes(first.in_shape)["W"]
    shape = ", ".join(str(d) for d in weight)
    err = _memory_error(MemoryError(f"Unable to allocate 1 PiB for an array with shape ({shape}) "
                                    "and data type float64"), args)
    assert (err.layer, err.field) == (first.name, None) and "parameter W" in err.message
    err = _memory_error(MemoryError(), argparse.Namespace(command="check", spec=CNN_BN, batch=4))
    assert (err.file, err.field) == (CNN_BN, "--batch") and "an allocation failed" in err.message


def test_a_spec_is_read_up_to_1_mib(tmp_path):
    spec = tmp_path / "long.toml"
    body = (EXAMPLES / "bce.toml").read_text()
    padding = "# " + "x" * 98 + "\n"
    spec.write_text(body + padding * ((MAX_SPEC_BYTES - len(body)) // len(padding)))
    assert spec.stat().st_size <= MAX_SPEC_BYTES == 2**20
    symbp.load_spec(spec)
    spec.write_text(body + padding * (MAX_SPEC_BYTES // len(padding) + 1))
    with pytest.raises(SpecError, match="larger than 1 MiB") as err:
        symbp.load_spec(spec)
    assert err.value.file == str(spec)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_as_the_spec_is_one_line(capsys):
    # it was read whole, 20 s of it, and then an empty "not enough memory: " line
    err = one_line_error(capsys, ["derive", "/dev/zero"])
    assert err == "symbp: error: /dev/zero: is larger than 1 MiB, symbp's limit on a spec file\n"


# -- 21: a byte-order mark -------------------------------------------------------------------------


def test_a_spec_with_a_utf8_byte_order_mark_is_read(tmp_path):
    body = (EXAMPLES / "bce.toml").read_text()
    spec = tmp_path / "bom.toml"
    spec.write_bytes(b"\xef\xbb\xbf" + body.encode())  # what Notepad writes
    assert symbp.codegen(spec) == symbp.codegen(EXAMPLES / "bce.toml")
    assert symbp.parse_spec("\ufeff" + body).name == symbp.parse_spec(body).name == "bce"


# -- 20: an output that is the spec -------------------------------------------------------------


@pytest.mark.parametrize(
    "command, target",
    [
        (["codegen", "{spec}", "-o", "{target}"], "net.toml"),
        (["latex", "{spec}", "-o", "{target}", "--format", "md"], "./net.toml"),
        (["flow", "{spec}", "--plot", "{target}"], "net.toml"),
        (["codegen", "{spec}", "-o", "{target}"], "link.toml"),  # a symbolic link to it
        (["codegen", "{spec}", "-o", "{target}"], "hard.toml"),  # a hard link to it
        (["codegen", "{spec}", "-o", "{target}"], "sub/../net.toml"),
    ],
)
def test_an_output_naming_the_spec_itself_is_refused(capsys, tmp_path, monkeypatch, command,
                                                      target):
    monkeypatch.chdir(tmp_path)
    text = (EXAMPLES / "bce.toml").read_text()
    Path("net.toml").write_text(text)
    Path("sub").mkdir()
    Path("link.toml").symlink_to("net.toml")
    Path("hard.toml").hardlink_to("net.toml")
    argv = [part.format(spec="net.toml", target=target) for part in command]
    err = one_line_error(capsys, argv)
    option = "--plot" if "--plot" in argv else "-o"
    assert err.startswith(f"symbp: error: net.toml: field '{option}': is the spec file itself")
    assert Path("net.toml").read_text() == text


# -- 22: layers by place are counted so that nobody reads a 0-based index -------------------------


@pytest.mark.parametrize(
    "layers, shown",
    [
        ('[[layers]]\ntype = "relu"\n[[layers]]\nout = 3\n', "layer 2 of [[layers]], field 'type'"),
        ('[[layers]]\ntype = "relu"\n[[layers]]\ntype = "relu"\nname = 5\n',
         "layer 2 of [[layers]], field 'name'"),
        ('[[layers]]\ntype = "residual"\nname = "res"\nlayers = [{ type = "relu" }, 7]\n',
         "layer 2 of the block 'res': must be a table"),
        ('[[layers]]\ntype = "residual"\nname = 4\nlayers = [{ type = "relu" }, {}]\n',
         "layer 2 of the block 1 of [[layers]], field 'type'"),
    ],
)
def test_a_layer_without_a_name_is_shown_by_its_place_from_1(capsys, tmp_path, layers, shown):
    spec = tmp_path / "net.toml"
    spec.write_text("input = { features = 3 }\n" + layers)
    err = one_line_error(capsys, ["derive", str(spec)])
    assert err.startswith(f"symbp: error: {spec}: {shown}"), err
    assert "layers[" not in err


# -- small things: --version, flags that must be booleans --------------------------------------


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"symbp {symbp.__version__}\n"
    # written in one place: the package metadata reads it from symbp.__version__
    pyproject = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "symbp.version.__version__"}


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: symbp.notes(BCE, steps="yes"), "steps"),
        (lambda: symbp.notes(BCE, fragment=1), "fragment"),
        (lambda: symbp.notes(BCE, flow="no"), "flow"),  # "no" is truthy: it would add the flow
        (lambda: symbp.check(BCE, full="yes"), "full"),
    ],
    ids=["steps", "fragment", "flow", "full"],
)
def test_flags_of_the_api_must_be_booleans(call, field):
    with pytest.raises(SpecError, match="must be True or False") as err:
        call()
    assert err.value.field == field


def test_a_batch_beyond_numpy_addresses_is_one_line(capsys):
    # 10**16 samples of 3*32*32 float64 are more bytes than an address holds: NumPy's
    # "array is too big" ValueError was a traceback, exit 1
    err = one_line_error(capsys, ["check", CNN_BN, "--batch", "10000000000000000"])
    assert err.startswith(f"symbp: error: {CNN_BN}: field '--batch': not enough memory")
