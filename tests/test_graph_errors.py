"""Graph specs that are wrong: one line naming the file, the layer and the field, exit 2."""

from __future__ import annotations

import textwrap

import pytest

from symbp.cli import main as cli_main

HEAD = """
    name = "bad"
    input = { features = 4 }
    loss = "mse"
"""


def layer(text: str) -> str:
    return "\n[[layers]]\n" + textwrap.dedent(text)


CASES = {
    "a later layer (a cycle)": (
        layer('type = "linear"\nname = "a"\nout = 4\ninputs = ["b"]')
        + layer('type = "linear"\nname = "b"\nout = 4'),
        "a", "inputs", "comes after it",
    ),
    "its own output": (
        layer('type = "tanh"\nname = "a"\ninputs = ["a"]'), "a", "inputs", "no cycles",
    ),
    "an unknown value": (
        layer('type = "tanh"\nname = "a"\ninputs = ["nope"]'), "a", "inputs",
        "unknown input 'nope'",
    ),
    "a split by its name, not a part": (
        layer('type = "split"\nname = "s"\nsizes = [2, 2]')
        + layer('type = "tanh"\nname = "t"\ninputs = ["s"]'), "t", "inputs", "s.0, s.1",
    ),
    "one value for add": (
        layer('type = "add"\nname = "j"'), "j", "inputs", "add reads 2 values, got 1",
    ),
    "three values for a one-input layer": (
        layer('type = "linear"\nname = "a"\nout = 4')
        + layer('type = "tanh"\nname = "t"\ninputs = ["a", "x"]'), "t", "inputs",
        "tanh reads one value, got 2",
    ),
    "one value for concat": (
        layer('type = "concat"\nname = "c"\ninputs = ["x"]'), "c", "inputs",
        "two or more values",
    ),
    "values of two shapes for add": (
        layer('type = "linear"\nname = "a"\nout = 5')
        + layer('type = "add"\nname = "j"\ninputs = ["a", "x"]'), "j", "inputs", "[5], [4]",
    ),
    "matmul of the wrong shapes": (
        layer('type = "matmul"\nname = "m"\ninputs = ["x", "x2"]'), "m", "inputs",
        "(A, B) by (B, C)",
    ),
    "the same value twice": (
        layer('type = "add"\nname = "j"\ninputs = ["x", "x"]'), "j", "inputs",
        "names a value twice",
    ),
    "split sizes that do not add up": (
        layer('type = "split"\nname = "s"\nsizes = [2, 3]'), "s", "sizes", "add up to 5",
    ),
    "a layer nobody reads": (
        layer('type = "linear"\nname = "a"\nout = 4')
        + layer('type = "linear"\nname = "b"\nout = 4\ninputs = ["x"]'), "a", "inputs",
        "read by no layer",
    ),
    "share of an unknown layer": (
        layer('type = "linear"\nname = "a"\nout = 4\nshare = "enc"'), "a", "share",
        "no layer named 'enc'",
    ),
    "share of another type": (
        layer('type = "linear"\nname = "a"\nout = 4')
        + layer('type = "prelu"\nname = "p"\nshare = "a"'), "p", "share",
        "only a layer of the same type",
    ),
    "share of other shapes": (
        layer('type = "linear"\nname = "a"\nout = 3')
        + layer('type = "linear"\nname = "b"\nout = 3\nshare = "a"'), "b", "share",
        "'a' has parameters W [4, 3]",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_bad_graph_is_one_line_naming_the_layer_and_the_field(case, tmp_path, capsys):
    body, name, field, message = CASES[case]
    head = HEAD
    if "matmul" in body:
        head = 'name = "bad"\nloss = "mse"\ninputs = { x = [2, 3], x2 = [2, 3] }\n'
    spec = tmp_path / "bad.toml"
    spec.write_text(textwrap.dedent(head) + body)
    assert cli_main(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"symbp: error: {spec}: layer '{name}', field '{field}': "), err
    assert message in err, err


def test_a_reserved_or_unread_network_input_is_refused(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    for inputs, message in (("params = [4]", "reserved"), ("x = [4]\nm = [4]", "'m' is read"),
                            ("d_x = [4]", "reserved"), ("tanh_forward = [4]", "reserved")):
        spec.write_text(f'name = "bad"\nloss = "mse"\n[inputs]\n{inputs}\n'
                        + layer('type = "linear"\nname = "a"\nout = 4'))
        assert cli_main(["derive", str(spec)]) == 2
        err = capsys.readouterr().err
        assert "field 'inputs'" in err and message in err, err


def test_an_input_named_as_a_random_draw_is_refused(tmp_path, capsys):
    """dropout draws its mask into the forward's local m: an input m would be overwritten."""
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "bad"\nloss = "mse"\n[inputs]\nx = [4]\nm = [4]\n'
                    + layer('type = "dropout"\nname = "drop"')
                    + layer('type = "add"\nname = "j"\ninputs = ["drop", "m"]'))
    assert cli_main(["derive", str(spec)]) == 2
    assert "input name 'm' is a name layer 'drop' uses" in capsys.readouterr().err
