"""The command line and the top-level Python API at their edges: a bad command line is one line
on stderr with exit 2 (as a bad spec is), a closed pipe is no traceback, ``symbp.check`` stays
the function whatever was imported before, and its arguments are checked like a spec's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
MLP_BN = str(ROOT / "examples" / "mlp_bn.toml")

BAD_COMMAND_LINES = {
    "no command": [],
    "unknown command": ["train", MLP_BN],
    "unknown notation": ["latex", MLP_BN, "-o", "-", "--notation", "foo"],
    "unknown dtype": ["flow", MLP_BN, "--dtype", "float16"],
    "negative seed": ["check", MLP_BN, "--seed", "-1"],
    "batch not a number": ["check", MLP_BN, "--batch", "two"],
    "missing -o": ["codegen", MLP_BN],
    "unknown flag": ["derive", MLP_BN, "--fast"],
}


@pytest.mark.parametrize("argv", BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES.keys())
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("symbp") and ": error: " in captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert "--help" in captured.err  # where to look next


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["check", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--batch" in out and "--seed" in out and "--full" in out


def test_check_refuses_a_batch_of_one_for_batch_norm_by_name(capsys):
    assert cli_main(["check", MLP_BN, "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "mlp_bn.toml" in err and "'--batch'" in err and "batch norm" in err


def test_a_closed_pipe_is_no_traceback():
    # `symbp derive SPEC | head -1`: the reader goes away while symbp still has to write.
    # Closed here before symbp writes anything (it derives first), so every write fails.
    with subprocess.Popen(
        [sys.executable, "-m", "symbp", "derive", MLP_BN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as derive:
        derive.stdout.close()
        err = derive.stderr.read().decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert derive.returncode == 141  # as a process killed by SIGPIPE reports it


TINY = dict(input_features=2, loss="mse")


def test_symbp_check_stays_the_function_after_importing_its_subpackage():
    # Importing a submodule sets it as an attribute of its parent package: once, that replaced
    # symbp.check (the function) by symbp.check (the package, now symbp.checking) after the
    # first call or after importing symbp.flow, which imports the checker.
    import symbp.checking.gradcheck  # noqa: F401
    import symbp.flow.numeric  # noqa: F401
    from symbp.checking import gradcheck

    net = symbp.Net([symbp.linear(3), symbp.tanh(), symbp.linear(2)], **TINY)
    assert callable(symbp.check) and callable(symbp.derive)
    assert symbp.check(net).passed
    assert symbp.check(net, seed=1).passed
    assert gradcheck.check_spec is not None  # the subpackage is still reachable by import


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch": 1}, "batch"),
        ({"batch": 0}, "batch"),
        ({"batch": 2.5}, "batch"),
        ({"batch": True}, "batch"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_check_arguments_are_checked_like_a_spec(kwargs, field):
    net = symbp.Net([symbp.linear(3), symbp.batchnorm(), symbp.linear(2)], **TINY)
    with pytest.raises(symbp.SpecError) as err:
        symbp.check(net, **kwargs)
    assert err.value.field == field


def test_check_runs_on_one_sample_without_batch_norm():
    net = symbp.Net([symbp.linear(3), symbp.sigmoid(), symbp.linear(2)], **TINY)
    report = symbp.check(net, batch=1)
    assert report.passed
    assert any(row.name == "x" and row.shape == (1, 2) for row in report.rows)


@pytest.mark.parametrize(
    "argv",
    [
        ["check", str(ROOT / "examples" / "bce.toml"), "--batch", "100000000000000"],
        ["flow", str(ROOT / "examples" / "bce.toml"), "--grad-batch", "100000000000000"],
    ],
    ids=["check", "flow"],
)
def test_a_batch_too_big_for_memory_is_one_line(capsys, argv):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: symbp.Net([symbp.relu()], input_shape=5),
        lambda: symbp.Net([symbp.relu()], input_shape=np.array([1, 2, 2])),
        lambda: symbp.notes(5),
        lambda: symbp.load_spec(None),
        lambda: symbp.parse_spec(None),
        lambda: symbp.derive(3.5),
        lambda: symbp.codegen(["fc1"]),
        lambda: symbp.check(None),
    ],
    ids=["shape int", "shape array", "notes int", "load None", "parse None", "derive float",
         "codegen list", "check None"],
)
def test_the_api_refuses_what_is_not_a_net_or_spec_with_a_spec_error(call):
    with pytest.raises(symbp.SpecError):
        call()


def test_derive_codegen_and_check_take_a_spec_path_like_notes():
    bce = ROOT / "examples" / "bce.toml"
    net = symbp.load_spec(bce)
    assert symbp.codegen(str(bce)) == symbp.codegen(bce) == symbp.codegen(net)
    assert symbp.derive(bce).layer("bn2").derivation.vjp.keys() == (
        symbp.derive(net).layer("bn2").derivation.vjp.keys()
    )
    assert symbp.check(bce).passed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["derive", MLP_BN, "--layer", "nope"], ["mlp_bn.toml", "'--layer'", "no layer named"]),
        (["derive", "--expr", "x*2", "--layer", "fc1"], ["'--layer'", "--expr"]),
    ],
)
def test_a_bad_layer_option_names_the_option(capsys, argv, words):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err
