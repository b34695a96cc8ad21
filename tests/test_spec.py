"""Spec files: every example loads; every kind of bad input is one located SpecError.

For each bad spec the loader must raise :class:`SpecError` naming the file, the layer and the
field, and ``symbp derive`` must exit with status 2 and print exactly one line on stderr, no
traceback -- checked in-process through ``symbp.cli.main`` and once in a real subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from symbp import cli
from symbp.declare import conv, layers
from symbp.declare.layers import REGISTRY, Loss
from symbp.declare.net import Net
from symbp.declare.spec import load_spec
from symbp.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

HEADER = 'name = "t"\ninput = { features = 4 }\nloss = "mse"\n'


# -- the examples -----------------------------------------------------------------------------
def test_the_examples_the_issue_asks_for_exist():
    names = {path.stem for path in EXAMPLES}
    assert {"mlp_bn", "deep_sigmoid", "residual_mlp", "custom_activation", "bce"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads(path):
    net = load_spec(path)
    assert net.name == path.stem
    assert net.loss is not None
    assert net.param_shapes


def test_examples_use_every_dense_layer_type():
    """Every type of :mod:`symbp.declare.layers` (not the image layers) is in some example."""
    dense = {kind for kind, cls in REGISTRY.items() if cls.__module__ != conv.__name__}
    used = set()
    for path in EXAMPLES:
        net = load_spec(path)
        used |= {item.layer.kind for item in net.walk()} | {net.loss.kind}
    assert dense <= used


def test_mlp_bn_example_shapes():
    net = load_spec(ROOT / "examples" / "mlp_bn.toml")
    assert net.param_shapes["fc1.W"] == (784, 256)
    assert net.param_shapes["res1_linear1.W"] == (256, 256)
    assert net.param_shapes["out.b"] == (10,)
    assert [item.name for item in net.walk()] == [
        "fc1", "bn1", "relu3", "res1", "res1_linear1", "mish", "out"
    ]


# -- bad input: the table -----------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    text: str  # the spec file's contents
    layer: str | None  # the layer the error must name (None: not about a layer)
    field: str | None  # the field it must name
    words: str  # a fragment of the message


def _layer(body: str, header: str = HEADER) -> str:
    return header + "\n[[layers]]\n" + body + "\n"


BAD = {
    "unknown_layer_type": Bad(_layer('type = "conv9"\nname = "c1"'), "c1", "type", "conv9"),
    "loss_as_layer_type": Bad(_layer('type = "mse"\nname = "c1"'), "c1", "type", "unknown"),
    "type_not_a_string": Bad(_layer('type = 3\nname = "c1"'), "c1", "type", "unknown"),
    "missing_type": Bad(_layer('name = "fc1"\nout = 3'), "fc1", "type", "missing"),
    "missing_out": Bad(_layer('type = "linear"\nname = "fc1"'), "fc1", "out", "missing"),
    "missing_expr": Bad(_layer('type = "activation"\nname = "a1"'), "a1", "expr", "missing"),
    "missing_in_residual": Bad(
        _layer('type = "residual"\nname = "res1"\nlayers = [ { type = "linear" } ]'),
        "res1_linear1", "out", "missing",  # the name the network gives it
    ),
    "missing_in_unnamed": Bad(
        _layer('type = "conv2d"\nkernel = 3'), "conv2d1", "out_channels", "missing"
    ),
    "residual_entry_not_a_table": Bad(
        _layer('type = "residual"\nname = "res"\nlayers = [5]'),
        "1 of the block 'res'", None, "table",
    ),
    "out_string": Bad(_layer('type = "linear"\nname = "fc1"\nout = "abc"'), "fc1", "out", "abc"),
    "out_zero": Bad(_layer('type = "linear"\nname = "fc1"\nout = 0'), "fc1", "out", "positive"),
    "out_true": Bad(_layer('type = "linear"\nname = "fc1"\nout = true'), "fc1", "out", "True"),
    "out_float": Bad(_layer('type = "linear"\nname = "fc1"\nout = 3.5'), "fc1", "out", "3.5"),
    "bias_string": Bad(
        _layer('type = "linear"\nname = "fc1"\nout = 4\nbias = "yes"'), "fc1", "bias", "yes"
    ),
    "slope_string": Bad(
        _layer('type = "leaky_relu"\nname = "a1"\nslope = "a"'), "a1", "slope", "number"
    ),
    "eps_negative": Bad(_layer('type = "batchnorm"\nname = "bn"\neps = -1'), "bn", "eps", "-1"),
    "alpha_infinite": Bad(_layer('type = "elu"\nname = "e1"\nalpha = inf'), "e1", "alpha",
                          "finite"),
    "init_nan": Bad(_layer('type = "prelu"\nname = "p1"\ninit = nan'), "p1", "init", "finite"),
    "momentum_above_one": Bad(
        _layer('type = "batchnorm"\nname = "bn"\nmomentum = 2'), "bn", "momentum", "(0, 1]"
    ),
    "rrelu_bounds": Bad(
        _layer('type = "rrelu"\nname = "r1"\nlower = 0.5\nupper = 0.1'), "r1", "upper", "below"
    ),
    "unknown_field": Bad(_layer('type = "linear"\nname = "fc1"\nouts = 3'), "fc1", "outs", "out"),
    "duplicate_name": Bad(
        _layer('type = "linear"\nname = "fc1"\nout = 4')
        + '[[layers]]\ntype = "relu"\nname = "fc1"\n',
        "fc1", "name", "duplicate",
    ),
    "duplicate_with_generated_name": Bad(
        _layer('type = "linear"\nname = "relu2"\nout = 4') + '[[layers]]\ntype = "relu"\n',
        "relu2", "name", "duplicate",
    ),
    "name_with_dash": Bad(
        _layer('type = "linear"\nname = "fc-1"\nout = 4'), "fc-1", "name", "identifier"
    ),
    "name_keyword": Bad(
        _layer('type = "linear"\nname = "class"\nout = 4'), "class", "name", "reserved"
    ),
    "name_leading_digit": Bad(
        _layer('type = "linear"\nname = "1x"\nout = 4'), "1x", "name", "identifier"
    ),
    "name_reserved": Bad(
        _layer('type = "relu"\nname = "forward"'), "forward", "name", "reserved"
    ),
    "name_not_a_string": Bad(
        _layer('type = "relu"\nname = 3'), "1 of [[layers]]", "name", "string"
    ),
    "name_empty": Bad(
        _layer('type = "relu"\nname = ""'), "1 of [[layers]]", "name", "identifier"
    ),
    "network_name": Bad(
        _layer('type = "relu"', header='name = "my-net"\ninput = { features = 4 }\n'),
        None, "name", "identifier",
    ),
    "residual_width_mismatch": Bad(
        _layer('type = "residual"\nname = "res1"\nlayers = [ { type = "linear", out = 3 } ]'),
        "res1", "layers", "width",
    ),
    "residual_width_mismatch_nested": Bad(
        _layer(
            'type = "residual"\nname = "res1"\n'
            'layers = [ { type = "residual", name = "inner", layers = [ { type = "linear", '
            'out = 2 } ] } ]'
        ),
        "inner", "layers", "width",
    ),
    "residual_body_not_a_list": Bad(
        _layer('type = "residual"\nname = "res1"\nlayers = "abc"'), "res1", "layers", "list"
    ),
    "softmax_ce_one_output": Bad(
        _layer(
            'type = "linear"\nname = "out"\nout = 1',
            header='input = { features = 4 }\nloss = "softmax_cross_entropy"\n',
        ),
        None, "loss", "at least 2 outputs (one per class); for one output use bce_with_logits "
        "(the output of layer 'out')",
    ),
    "loss_on_an_image_output": Bad(
        _layer('type = "relu"\nname = "act"',
               header='input = { shape = [2, 4, 4] }\nloss = "softmax_cross_entropy"\n'),
        None, "loss", "feature-vector output, got [2, 4, 4] (the output of layer 'act')",
    ),
    "unknown_loss": Bad(
        _layer('type = "linear"\nname = "out"\nout = 2',
               header='input = { features = 4 }\nloss = "hinge"\n'),
        None, "loss", "hinge",
    ),
    "loss_not_a_string": Bad(
        _layer('type = "relu"', header="input = { features = 4 }\nloss = 3\n"), None, "loss", "3"
    ),
    "malicious_expression": Bad(
        _layer('type = "activation"\nname = "evil"\nexpr = "__import__(\'os\').system(\'ls\')"'),
        "evil", "expr", "not allowed",
    ),
    "malicious_expression_in_residual": Bad(
        _layer(
            'type = "residual"\nname = "res1"\n'
            'layers = [ { type = "activation", name = "evil", expr = "x.__class__" } ]'
        ),
        "evil", "expr", "Attribute",
    ),
    "overflowing_number_in_expression": Bad(
        _layer('type = "activation"\nname = "a1"\nexpr = "1e400*x"'), "a1", "expr", "float64"
    ),
    "huge_power_in_expression": Bad(
        _layer('type = "activation"\nname = "a1"\nexpr = "9**9**9*x"'), "a1", "expr", "float64"
    ),
    "unknown_name_in_expression": Bad(
        _layer('type = "activation"\nname = "a1"\nexpr = "y*x"'), "a1", "expr", "'y'"
    ),
    "unknown_top_level_key": Bad(HEADER + "foo = 1\n" + _layer('type = "relu"', ""), None, None,
                                 "foo"),
    "missing_input": Bad(_layer('type = "relu"', 'name = "t"\n'), None, "input", "table"),
    "bad_dtype": Bad(_layer('type = "relu"', HEADER + 'dtype = "int8"\n'), None, "dtype", "int8"),
    "no_layers": Bad(HEADER, None, "layers", "layers"),
    "invalid_toml": Bad('name = "t"\ninput = { features = 4\n', None, None, "invalid TOML"),
}


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "spec.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def _error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def _layer_text(layer: str) -> str:
    """How an error shows a layer: a name quoted, a place (``1 of [[layers]]``) not."""
    return f"layer {layer}" if " of " in layer else f"layer '{layer}'"


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_bad_spec_error_names_file_layer_and_field(bad, write):
    path = write(bad.text)
    error = _error(path)
    assert error.file == str(path)
    assert error.layer == bad.layer
    assert error.field == bad.field
    assert bad.words in error.message
    text = str(error)
    assert text.startswith(f"{path}: ")
    if bad.layer is not None:
        assert _layer_text(bad.layer) in text
    if bad.field is not None:
        assert f"field '{bad.field}'" in text


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_cli_reports_bad_spec_in_one_line_with_exit_2(bad, write, capsys):
    path = write(bad.text)
    assert cli.main(["derive", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"symbp: error: {path}: ")
    assert bad.words in lines[0]
    if bad.layer is not None:
        assert _layer_text(bad.layer) in lines[0]
    if bad.field is not None:
        assert f"field '{bad.field}'" in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("directory", [False, True], ids=["no_such_dir", "a_dir"])
@pytest.mark.parametrize(("command", "suffix"), [("codegen", ".py"), ("latex", ".md")])
def test_an_output_path_that_cannot_be_written_is_bad_input(tmp_path, capsys, command, suffix,
                                                            directory):
    spec = EXAMPLES[0]
    path = tmp_path / ("out" + suffix if directory else "missing/dir/out" + suffix)
    if directory:
        path.mkdir()
    assert cli.main([command, str(spec), "-o", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"symbp: error: field '-o': cannot write {path}: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "flow"])
@pytest.mark.parametrize("seed", ["-1", "x"])
def test_a_seed_that_is_not_a_non_negative_integer_is_bad_input(capsys, command, seed):
    with pytest.raises(SystemExit) as info:
        cli.main([command, str(EXAMPLES[0]), "--seed", seed])
    assert info.value.code == 2
    assert "--seed: must be a non-negative integer" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.file == str(path)
    assert "no such file" in str(info.value)
    assert cli.main(["derive", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"symbp: error: {path}: no such file\n"


def test_invalid_toml_names_the_line(write):
    error = _error(write(BAD["invalid_toml"].text))
    assert "line 2" in error.message


def test_layer_option_naming_a_missing_layer(capsys):
    spec = str(ROOT / "examples" / "mlp_bn.toml")
    assert cli.main(["derive", spec, "--layer", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert "'nope'" in lines[0] and "layer" in lines[0]


def test_expr_and_spec_together_is_bad_input(capsys):
    spec = str(ROOT / "examples" / "mlp_bn.toml")
    assert cli.main(["derive", spec, "--expr", "x"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_neither_spec_nor_expr_is_bad_input(capsys):
    assert cli.main(["derive"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_malicious_cli_expression(capsys):
    assert cli.main(["derive", "--expr", "__import__('os').system('echo pwned')"]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    assert captured.err.startswith("symbp: error: field '--expr': function")
    assert len(captured.err.splitlines()) == 1


def test_bad_spec_in_a_real_subprocess(write):
    path = write(BAD["residual_width_mismatch"].text)
    result = subprocess.run(
        [sys.executable, "-m", "symbp", "derive", str(path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"symbp: error: {path}: layer 'res1', field 'layers': ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["derive", "codegen", "check", "latex"])
def test_every_command_reports_a_bad_spec_in_one_line(write, tmp_path, capsys, command):
    path = write(BAD["malicious_expression"].text)
    target = tmp_path / ("never.py" if command == "codegen" else "never.md")
    output = ["-o", str(target)] if command in ("codegen", "latex") else []
    assert cli.main([command, str(path), *output]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not target.exists()
    assert captured.err == (
        f"symbp: error: {path}: layer 'evil', field 'expr': function \"__import__('os').system\""
        " is not allowed (allowed: abs, asinh, atan, cos, cosh, erf, erfc, exp, log, max, min,"
        " sin, sinh, sqrt, tanh)\n"
    )


# -- the same rules from the Python API --------------------------------------------------------
def test_python_api_residual_width_mismatch():
    with pytest.raises(SpecError) as info:
        Net([layers.Linear(3), layers.Residual([layers.Linear(4)])], input_features=3)
    assert (info.value.layer, info.value.field) == ("residual2", "layers")


def test_python_api_duplicate_name():
    with pytest.raises(SpecError) as info:
        Net([layers.Linear(3, name="a"), layers.Relu(name="a")], input_features=3)
    assert (info.value.layer, info.value.field) == ("a", "name")


def test_python_api_loss_that_does_not_fit():
    with pytest.raises(SpecError) as info:
        Net([layers.Linear(1)], input_features=3, loss="softmax_cross_entropy")
    assert info.value.field == "loss"


def test_python_api_refuses_a_loss_as_a_layer():
    with pytest.raises(SpecError):
        Net([layers.Linear(2), layers.Mse()], input_features=3)


def test_every_loss_kind_is_accepted_by_name():
    for kind, cls in REGISTRY.items():
        if issubclass(cls, Loss):
            net = Net([layers.Linear(2)], input_features=3, loss=kind)
            assert net.loss.kind == kind
