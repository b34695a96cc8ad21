"""Layers declared by their forward pass (``symbp.layer``, TOML ``type = "custom"``): the
generated gradients against PyTorch, finite differences, the proofs, the notes, ``symbp flow``,
and the one-line errors for bad stages."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import symbp
from symbp.checking.gradcheck import load_module
from symbp.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_layernorm.toml"

LAYER_NORM = [
    "mu[n] = sum(x[n, j], j) / D",
    "var[n] = sum((x[n, j] - mu[n])**2, j) / D",
    "y[n, j] = gamma[j] * (x[n, j] - mu[n]) / sqrt(var[n] + eps) + beta[j]",
]


def layer_norm(name: str = "ln", eps: float = 1e-5):
    return symbp.layer(
        LAYER_NORM,
        params={"gamma": "D", "beta": "D"},
        constants={"eps": eps},
        init={"gamma": "ones"},
        name=name,
    )


def forward_backward(net, params, x, dout):
    """The generated module's output and gradients (the input's as ``"x"``)."""
    module = load_module(symbp.codegen(net))
    out, cache = module.forward(params, x)
    return out, module.backward(params, cache, dout)


def random_params(net, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape) for key, shape in net.param_shapes.items()}


def torch_grads(torch, forward, params, x, dout):
    """``forward`` (torch) at ``params`` and ``x`` and the gradients of ``sum(out * dout)``, by
    PyTorch's autograd."""
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, "x": x}.items()}
    out = forward(tensors)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), {k: t.grad.numpy() for k, t in tensors.items()}


def assert_agree(ours, theirs, tolerance=1e-10):
    out, grads = ours
    expected_out, expected_grads = theirs
    np.testing.assert_allclose(out, expected_out, rtol=tolerance, atol=tolerance)
    assert set(grads) == set(expected_grads)
    for key, value in grads.items():
        np.testing.assert_allclose(value, expected_grads[key], rtol=tolerance, atol=tolerance,
                                   err_msg=key)


# -- the generated code against an independent computation ------------------------------------

def test_the_example_layer_norm_agrees_with_pytorch():
    """The hand-declared layer norm, in an MLP, against F.layer_norm: output and every gradient
    (the input's, the linear layers', gamma's and beta's) to 1e-10 in float64."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    net = symbp.load_spec(EXAMPLE)
    params = random_params(net, seed=1)
    rng = np.random.default_rng(2)
    x = 3 * rng.standard_normal((7, 16)) + 1
    dout = rng.standard_normal((7, 4))

    def reference(t):
        h = t["x"] @ t["fc1.W"] + t["fc1.b"]
        h = functional.layer_norm(h, (32,), t["ln.gamma"], t["ln.beta"], eps=1e-5)
        return torch.relu(h) @ t["out.W"] + t["out.b"]

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_the_loss_of_the_example_agrees_with_pytorch():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    net = symbp.load_spec(EXAMPLE)
    module = load_module(symbp.codegen(net))
    params = random_params(net, seed=3)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 16)), rng.integers(0, 4, size=5)
    loss, grads = module.loss_and_grads(params, x, y)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = torch.tensor(x) @ tensors["fc1.W"] + tensors["fc1.b"]
    h = functional.layer_norm(h, (32,), tensors["ln.gamma"], tensors["ln.beta"], eps=1e-5)
    z = torch.relu(h) @ tensors["out.W"] + tensors["out.b"]
    expected = functional.cross_entropy(z, torch.tensor(y))
    expected.backward()
    assert abs(loss - expected.item()) < 1e-12
    for key, tensor in tensors.items():
        np.testing.assert_allclose(grads[key], tensor.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_a_layer_with_its_own_size_and_a_scalar_parameter_agrees_with_pytorch():
    """A gated linear layer: a new size K (the output width), a matrix W (D, K), a scalar s."""
    torch = pytest.importorskip("torch")
    gated = symbp.layer(
        ["z[n, k] = sum(x[n, j] * W[j, k], j) + b[k]", "y[n, k] = z[n, k] * tanh(s * z[n, k])"],
        params={"W": "D, K", "b": "K", "s": ""},
        sizes={"K": 3},
        init={"s": 0.5},
        name="gated",
    )
    net = symbp.Net([gated], input_features=4)
    assert net.param_shapes == {"gated.W": (4, 3), "gated.b": (3,), "gated.s": ()}
    assert net.output_shape == (3,)
    params = random_params(net, seed=5)
    rng = np.random.default_rng(6)
    x, dout = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))

    def reference(t):
        z = t["x"] @ t["gated.W"] + t["gated.b"]
        return z * torch.tanh(t["gated.s"] * z)

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_statistics_over_the_batch_and_a_softmax_agree_with_pytorch():
    """Batch norm declared by hand (means over n) and a softmax (a sum of exponentials)."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    norm = symbp.layer(
        [
            "mu[j] = mean(x[n, j], n)",
            "var[j] = mean((x[n, j] - mu[j])**2, n)",
            "y[n, j] = gamma[j] * (x[n, j] - mu[j]) / sqrt(var[j] + eps) + beta[j]",
        ],
        params={"gamma": "D", "beta": "D"},
        constants={"eps": 1e-3},
        name="norm",
    )
    softmax = symbp.layer(["s[n] = sum(exp(x[n, k]), k)", "y[n, j] = exp(x[n, j]) / s[n]"],
                          name="soft")
    net = symbp.Net([norm, softmax], input_features=5)
    params = random_params(net, seed=7)
    rng = np.random.default_rng(8)
    x, dout = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))

    def reference(t):
        h = functional.batch_norm(t["x"], None, None, t["norm.gamma"], t["norm.beta"],
                                  training=True, eps=1e-3)
        return torch.softmax(h, dim=1)

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_the_python_api_and_the_spec_declare_the_same_network():
    spec = symbp.load_spec(EXAMPLE)
    net = symbp.Net(
        [symbp.linear(32, name="fc1"), layer_norm(), symbp.relu(), symbp.linear(4, name="out")],
        input_features=16,
        loss="softmax_cross_entropy",
        name="custom_layernorm",
    )
    assert symbp.codegen(net) == symbp.codegen(spec)


# -- everything a built-in layer gets ----------------------------------------------------------

def test_finite_differences_pass():
    report = symbp.check(EXAMPLE)
    assert report.passed, report.table()
    assert {row.name for row in report.rows} >= {"ln.gamma", "ln.beta", "x"}


def test_derive_shows_the_staged_and_the_compact_backward(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    assert cli_main(["derive", str(EXAMPLE), "--layer", "ln", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "backward, staged chain rule" in out and "backward (given dy)" in out
    for gradient in ("dvar[n] =", "dmu[n] =", "dx[n, j] =", "dgamma[j] =", "dbeta[j] ="):
        assert gradient in out


def test_derive_verify_proves_the_custom_layer(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one verdict a line
    assert cli_main(["derive", str(EXAMPLE), "--layer", "ln", "--verify"]) == 0
    verdicts = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("  verify ")]
    assert {"staged", "compact"} <= {v.split("(")[1].split(",")[0] for v in verdicts}
    assert verdicts and all("proven equal to direct differentiation" in v for v in verdicts)


def test_the_notes_show_the_stages_and_both_backward_forms():
    notes = str(symbp.notes(EXAMPLE, "md"))
    assert "### Layer 2: `ln`" in notes
    assert r"\mu_{n} &= \frac{1}{D} \sum_{j} x_{nj}" in notes
    assert "Substituting the intermediate gradients gives the compact form" in notes
    assert r"\frac{\partial J}{\partial \gamma_{j}}" in notes
    assert "\\" in str(symbp.notes(EXAMPLE, "tex"))


def test_flow_counts_what_the_custom_layer_keeps(capsys):
    assert cli_main(["flow", str(EXAMPLE), "--jacobian-batch", "0"]) == 0
    out = capsys.readouterr().out
    kept = re.findall(r"^ln +(\w+\[[^\]]*\]) ", out, re.MULTILINE)
    assert kept == ["x[N, D]", "mu[N]", "var[N]"]
    assert "matches" in out and "differs" not in out


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_the_generated_module_is_lint_clean(tmp_path):
    import subprocess

    path = tmp_path / "module.py"
    path.write_text(symbp.codegen(EXAMPLE), encoding="utf-8")
    done = subprocess.run(["ruff", "check", "--isolated", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# -- bad stages: one line, exit 2 --------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("symbp: error: ") and captured.err.count("\n") == 1, captured
    return captured.err


def spec(params: str, stages: list[str], extra: str = "") -> str:
    quoted = ", ".join(json.dumps(stage) for stage in stages)  # a TOML basic string
    return f"""input = {{ features = 4 }}
loss = "mse"

[[layers]]
type = "custom"
name = "norm"
params = {params}
constants = {{ eps = 1e-5 }}
stages = [{quoted}]
{extra}
"""


BAD_STAGES = {
    "index on the left, not bound": (
        "{}", ["mu[n, k] = sum(x[n, j], j) / D", "y[n, j] = x[n, j] - mu[n, j]"],
        "stage 1 (mu): index 'k' is on the left side but not bound",
    ),
    "index on the right, not on the left": (
        "{ gamma = \"D\" }", ["y[n] = gamma[j] * x[n, j]"],
        "index 'j' in gamma[j] is neither on the left side nor summed over",
    ),
    "summed index that does not exist": (
        "{}", ["y[n, j] = x[n, j] - sum(x[n, i], k) / D"],
        "sum(x[n, i], k): sums over 'k', but no array inside the sum is indexed by 'k'",
    ),
    "a size that is not one": (
        "{}", ["y[n, j] = x[n, j] / E"],
        "unknown name 'E': not a size of the input or of a parameter",
    ),
    "a parameter's size that is not one": (
        "{ gamma = \"E\" }", ["y[n, j] = gamma[j] * x[n, j]"],
        "field 'params.gamma': size 'E' is not a size of the input or one declared in sizes",
    ),
    "reads a later stage": (
        "{}", ["y[n, j] = x[n, j] - mu[n]", "mu[n] = sum(x[n, j], j) / D"],
        "stage 1 (y): reads 'mu', which a later stage defines",
    ),
    "reads itself": (
        "{}", ["y[n, j] = x[n, j] + y[n, j]"], "stage 1 (y): stage 'y' reads itself",
    ),
    "a parameter with too few axes": (
        "{ W = \"D\" }", ["y[n, k] = sum(x[n, j] * W[j, k], j)"],
        "W[j, k]: W has 1 axis (declared 'D'), but 2 indices are given",
    ),
    "a parameter indexed along another size": (
        "{ gamma = \"D\" }", ["y[n, j] = gamma[n] * x[n, j]"],
        "index 'n' runs over D in gamma[n] but over N in x[n, j] (check gamma's shape 'D')",
    ),
    "a disallowed function": (
        "{}", ["y[n, j] = foo(x[n, j])"], "stage 1: function 'foo' is not allowed (allowed: ",
    ),
    "import": (
        "{}", ["y[n, j] = __import__('os').getcwd() * x[n, j]"],
        "attribute access (__import__('os').getcwd) is not allowed",
    ),
    "a dunder call": ("{}", ["y[n, j] = __import__('os')"], "function '__import__' is not"),
    "eval": ("{}", ["y[n, j] = eval('1') * x[n, j]"], "function 'eval' is not allowed"),
    "attribute access": (
        "{}", ["y[n, j] = x.__class__ * x[n, j]"], "attribute access (x.__class__)",
    ),
    "a lambda": ("{}", ["y[n, j] = (lambda: 1)() * x[n, j]"], "is not allowed"),
    "a comprehension": ("{}", ["y[n, j] = [a for a in x] * x[n, j]"], "is not allowed"),
    "two statements": ("{}", ["y[n, j] = x[n, j]; import os"], "is not one stage"),
    "a keyword argument": ("{}", ["y[n, j] = sum(x[n, j], axis=1)"], "positional arguments"),
    "an index expression": ("{}", ["y[n, j] = x[n, j + 1]"], "subscripts are index names"),
    "a diagonal": (
        "{ W = \"D, D\" }", ["y[n, j] = x[n, j] * W[j, j]"],
        "W[j, j]: index 'j' appears twice in one subscript (a diagonal)",
    ),
    "an index used as a number": ("{}", ["y[n, j] = x[n, j] * j"], "index 'j' is used as"),
    "an output without the batch first": (
        "{}", ["y[j] = sum(x[n, j], n)"], "its first index, and only that one, must run over",
    ),
    "a reserved name": ("{ np = \"D\" }", ["y[n, j] = np[j] * x[n, j]"], "is a reserved name"),
    "a name of a gradient": (
        "{}", ["mu[n] = sum(x[n, j], j)", "dmu[n, j] = x[n, j] - mu[n]"],
        "'dmu' would clash with the gradient of 'mu'",
    ),
    "an unread parameter": (
        "{ gamma = \"D\" }", ["y[n, j] = x[n, j]"], "no stage reads the parameter 'gamma'",
    ),
}


@pytest.mark.parametrize("case", BAD_STAGES, ids=str)
def test_bad_stages_are_one_line_naming_the_file_layer_and_field(case, capsys, tmp_path):
    params, stages, message = BAD_STAGES[case]
    path = tmp_path / "bad.toml"
    path.write_text(spec(params, stages), encoding="utf-8")
    line = one_line_error(capsys, ["derive", str(path)])
    assert f"{path}: layer 'norm', field '" in line
    assert message in line, line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('init = { gamma = "glorot" }', "field 'init.gamma': must be one of fan, zeros, ones"),
        ('sizes = { K = 0 }', "field 'sizes.K': must be a positive integer"),
        ('input_sizes = ["C", "H"]', "field 'input_sizes': names 2 sizes"),
        ('keep = ["z"]', "field 'keep': must be a list of stage names (of y)"),
        ("bogus = 1", "field 'bogus': unknown field for custom"),
    ],
)
def test_bad_fields_are_one_line(extra, message, capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(spec('{ gamma = "D" }', ["y[n, j] = gamma[j] * x[n, j]"], extra),
                    encoding="utf-8")
    assert message in one_line_error(capsys, ["derive", str(path)])


def test_a_stage_runs_no_code(tmp_path, capsys):
    """A stage that would run a command is refused before anything runs it."""
    target = tmp_path / "pwned"
    stage = f"y[n, j] = x[n, j] + __import__('os').system('touch {target}')"
    path = tmp_path / "bad.toml"
    path.write_text(spec("{}", [stage]), encoding="utf-8")
    one_line_error(capsys, ["codegen", str(path), "-o", str(tmp_path / "out.py")])
    assert not target.exists()


def test_the_python_api_raises_spec_errors():
    with pytest.raises(symbp.SpecError, match="function 'open' is not allowed"):
        symbp.layer(["y[n, j] = open(x[n, j])"])
    with pytest.raises(symbp.SpecError, match="reads 'mu', which a later stage defines"):
        symbp.Net([symbp.layer(["y[n, j] = x[n, j] - mu[n]", "mu[n] = sum(x[n, j], j)"])],
                  input_features=3)


def test_an_array_read_through_a_view_is_not_overwritten():
    """The gated layer without a bias: its backward reads arrays through views
    (``dy[:, :, None]``, ``tanh_s_z_squared[:, :, None]``) after the last direct read of the
    arrays; their memory was once reused for a product in between, and the gradients below
    the layer were wrong."""
    torch = pytest.importorskip("torch")
    gated = symbp.layer(
        ["z[n, k] = sum(x[n, j] * W[j, k], j)", "y[n, k] = z[n, k] * tanh(s * z[n, k])"],
        params={"W": "D, K", "s": ""},
        sizes={"K": 4},
        name="gated",
    )
    net = symbp.Net([symbp.linear(5, name="fc"), gated, symbp.linear(3, name="out")],
                    input_features=4)
    params = random_params(net, seed=9)
    rng = np.random.default_rng(10)
    x, dout = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))

    def reference(t):
        z = (t["x"] @ t["fc.W"] + t["fc.b"]) @ t["gated.W"]
        return (z * torch.tanh(t["gated.s"] * z)) @ t["out.W"] + t["out.b"]

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_keep_chooses_what_backward_reads_and_the_gradients_stay_right():
    """Layer norm as batch norm is declared (invstd, xhat) with ``keep``: backward reads the
    stages named and agrees with F.layer_norm."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    norm = symbp.layer(
        [
            "mu[n] = mean(x[n, j], j)",
            "var[n] = mean((x[n, j] - mu[n])**2, j)",
            "invstd[n] = 1 / sqrt(var[n] + eps)",
            "xhat[n, j] = (x[n, j] - mu[n]) * invstd[n]",
            "y[n, j] = gamma[j] * xhat[n, j] + beta[j]",
        ],
        params={"gamma": "D", "beta": "D"},
        constants={"eps": 1e-5},
        keep=["xhat", "invstd"],
        name="ln",
    )
    net = symbp.Net([norm], input_features=6)
    source = symbp.codegen(net)
    reads = source.split("def ln_backward(")[1].split(")")[0]
    assert "xhat" in reads and "invstd" in reads and "mu" not in reads
    params = random_params(net, seed=11)
    rng = np.random.default_rng(12)
    x, dout = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))

    def reference(t):
        return functional.layer_norm(t["x"], (6,), t["ln.gamma"], t["ln.beta"], eps=1e-5)

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


@pytest.mark.parametrize("sign", [-1, -3])
def test_a_negative_product_of_a_matrix_product_is_printed_with_its_parentheses(sign):
    """``-a*b*(c @ d)``: sympy prints a negative product at a sum's precedence, where Python's
    ``@`` (of ``*``'s precedence) once lost its parentheses, ``-a*b*c @ d``."""
    import sympy as sp

    from symbp.derivation.arrays import Dot
    from symbp.emit.numpy_printer import SymbpNumPyPrinter

    a, b, c, d = sp.symbols("a b c d")
    code = SymbpNumPyPrinter().doprint(sign * a * b * Dot(c, d))
    rng = np.random.default_rng(13)
    values = {"a": rng.standard_normal(5), "b": rng.standard_normal(5),
              "c": rng.standard_normal((5, 6)), "d": rng.standard_normal(6)}
    expected = sign * values["a"] * values["b"] * (values["c"] @ values["d"])
    computed = eval(code, {"np": np}, values)  # the printer's own output, not user text
    np.testing.assert_allclose(computed, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "stage",
    [
        "y[n, j] = " + "-" * 1500 + "x[n, j]",
        "y[n, j] = x[n, j] + " + "+".join(["D"] * 900),
    ],
    ids=["minus signs", "a long sum"],
)
def test_a_deeply_nested_stage_is_one_line(stage, capsys, tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(spec("{}", [stage]), encoding="utf-8")
    assert "nested too deeply" in one_line_error(capsys, ["derive", str(path)])


def test_a_layer_on_images_agrees_with_pytorch():
    """A mean over the image's height and width (the sizes H and W): the engine once failed
    comparing its kept forms, with an unevaluated sum over a size it had given the value 0.37."""
    torch = pytest.importorskip("torch")
    center = symbp.layer(
        ["m[n, c] = mean(x[n, c, h, w], h, w)",
         "y[n, c, h, w] = g[c] * (x[n, c, h, w] - m[n, c])"],
        params={"g": "C"},
        name="center",
    )
    net = symbp.Net([center], input_shape=(2, 4, 3))
    params = random_params(net, seed=14)
    rng = np.random.default_rng(15)
    x, dout = rng.standard_normal((3, 2, 4, 3)), rng.standard_normal((3, 2, 4, 3))

    def reference(t):
        mean = t["x"].mean(dim=(2, 3), keepdim=True)
        return t["center.g"][:, None, None] * (t["x"] - mean)

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_a_scalar_parameter_scaling_everything_agrees_with_pytorch():
    """``y = s * x``: ds contracts every axis, a matrix product of shape (); the runtime's
    _tensordot once refused to reshape it (``reshape()`` with no shape)."""
    torch = pytest.importorskip("torch")
    net = symbp.Net([symbp.linear(3, name="fc"),
                     symbp.layer(["y[n, j] = x[n, j] * s"], params={"s": ""}, name="scale")],
                    input_features=2)
    params = random_params(net, seed=16)
    rng = np.random.default_rng(17)
    x, dout = rng.standard_normal((4, 2)), rng.standard_normal((4, 3))

    def reference(t):
        return (t["x"] @ t["fc.W"] + t["fc.b"]) * t["scale.s"]

    assert_agree(forward_backward(net, params, x, dout), torch_grads(torch, reference, params,
                                                                     x, dout))


def test_flow_reads_the_softmax_jacobian_off_its_derivation(capsys, tmp_path):
    """dy[n, k'']/dx[n, k] = (delta(k, k'') - y[n, k''])*y[n, k], softmax's textbook Jacobian.
    The output index was once named like the index dx sums over (k'), and differentiating by
    it turned the sum into sum_k'(y[n, k'])."""
    path = tmp_path / "soft.toml"
    path.write_text(
        'input = { features = 3 }\n\n[[layers]]\ntype = "custom"\nname = "soft"\n'
        'stages = ["s[n] = sum(exp(x[n, k]), k)", "y[n, j] = exp(x[n, j]) / s[n]"]\n',
        encoding="utf-8",
    )
    assert cli_main(["flow", str(path), "--jacobian-batch", "0"]) == 0
    out = capsys.readouterr().out
    assert "= (delta(k, k'') - y[n, k''])*y[n, k] delta(n, n')" in out
