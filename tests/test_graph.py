"""Networks as graphs (issue 25, part 1): named inputs, fan-out, layers reading several values,
weight sharing. Every generated module is checked against the same network written in PyTorch
(float64, autograd): the loss and every gradient, parameters and inputs, to 1e-10."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import symbp
from symbp.checking.gradcheck import load_module
from symbp.declare.spec import parse_spec

torch = pytest.importorskip("torch")
F = torch.nn.functional


def build(toml: str):
    net = parse_spec(textwrap.dedent(toml))
    return net, load_module(symbp.codegen(net), f"graph_{net.name}")


def random_arrays(shapes: dict, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    return {k: rng.standard_normal((*lead, *s)) for k, s in shapes.items()}


def mse(out, target):
    return ((out - target) ** 2).mean()


def compare(net, module, torch_forward, *, batch=3, seed=0, loss=mse):
    """The module's loss_and_grads against ``loss(torch_forward(params, inputs), y)``."""
    params = random_arrays(module.PARAM_SHAPES, seed)
    inputs = random_arrays(net.inputs, seed + 1, batch)
    y = np.random.default_rng(seed + 2).standard_normal((batch, *net.output_shape))
    ours, grads = module.loss_and_grads(params, *inputs.values(), y)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, **inputs}.items()}
    out = torch_forward({k: tensors[k] for k in params}, {k: tensors[k] for k in inputs})
    theirs = loss(out, torch.tensor(y))
    theirs.backward()
    assert abs(float(ours) - theirs.item()) <= 1e-10 * max(1.0, abs(theirs.item()))
    assert set(grads) == set(params) | set(inputs)
    for key, tensor in tensors.items():
        expected = tensor.grad.numpy()
        scale = max(1.0, float(np.max(np.abs(expected))))
        assert np.max(np.abs(grads[key] - expected)) <= 1e-10 * scale, key
    return grads


def linear(params, name, h):
    return h @ params[f"{name}.W"] + params[f"{name}.b"]


TWO_BRANCH = """
    name = "fan"
    input = { features = 4 }
    loss = "mse"

    [[layers]]
    type = "linear"
    name = "enc"
    out = 5

    [[layers]]
    type = "tanh"
    name = "a"

    [[layers]]
    type = "linear"
    name = "b"
    out = 5
    inputs = ["enc"]

    [[layers]]
    type = "add"
    name = "join"
    inputs = ["a", "b"]

    [[layers]]
    type = "linear"
    name = "out"
    out = 3
"""


def test_two_branches_fan_out_and_add_match_pytorch():
    net, module = build(TWO_BRANCH)

    def forward(p, x):
        enc = linear(p, "enc", x["x"])
        return linear(p, "out", torch.tanh(enc) + linear(p, "b", enc))

    compare(net, module, forward)


def test_fan_out_is_one_sum_in_the_plan():
    from symbp.derivation.plan import Sum, build_plan

    net, _ = build(TWO_BRANCH)
    plan = build_plan(net)
    assert plan.readers["enc"] == ["a", "b"]
    sums = [e for e in plan.backward if isinstance(e, Sum)]
    assert [(s.target, s.parts) for s in sums] == [("denc", ("denc@b", "denc@a"))]
    # the sum comes after both readers' backward and before enc's: reverse topological order
    order = [e.name for e in plan.backward]
    assert order.index("sum enc") > max(order.index("a"), order.index("b"))
    assert order.index("sum enc") < order.index("enc")


def test_multiply_concat_and_split_match_pytorch():
    net, module = build("""
        name = "mcs"
        input = { features = 4 }
        loss = "mse"

        [[layers]]
        type = "linear"
        name = "fc"
        out = 6

        [[layers]]
        type = "split"
        name = "parts"
        sizes = [2, 4]

        [[layers]]
        type = "sigmoid"
        name = "gate"
        inputs = ["parts.0"]

        [[layers]]
        type = "concat"
        name = "cat"
        inputs = ["gate", "parts.1", "x"]

        [[layers]]
        type = "split"
        name = "halves"
        sizes = [5, 5]

        [[layers]]
        type = "multiply"
        name = "prod"
        inputs = ["halves.1", "halves.0"]

        [[layers]]
        type = "linear"
        name = "out"
        out = 2
    """)
    assert net.output_shape == (2,)

    def forward(p, x):
        fc = linear(p, "fc", x["x"])
        cat = torch.cat([torch.sigmoid(fc[:, :2]), fc[:, 2:], x["x"]], dim=1)
        return linear(p, "out", cat[:, 5:] * cat[:, :5])

    compare(net, module, forward)


def test_matmul_of_two_activations_matches_pytorch():
    net, module = build("""
        name = "mm"
        loss = "mse"

        [inputs]
        a = [3, 4]
        b = [4, 2]

        [[layers]]
        type = "tanh"
        name = "ta"
        inputs = ["a"]

        [[layers]]
        type = "matmul"
        name = "prod"
        inputs = ["ta", "b"]

        [[layers]]
        type = "flatten"
    """)
    assert net.find("prod").out_shape == (3, 2)

    def forward(p, x):
        return (torch.tanh(x["a"]) @ x["b"]).reshape(-1, 6)

    compare(net, module, forward)


def test_shared_weights_sum_their_gradients_and_are_listed_once():
    net, module = build("""
        name = "tied"
        input = { features = 4 }
        loss = "mse"

        [[layers]]
        type = "linear"
        name = "enc"
        out = 4

        [[layers]]
        type = "tanh"

        [[layers]]
        type = "linear"
        name = "again"
        out = 4
        share = "enc"

        [[layers]]
        type = "linear"
        name = "out"
        out = 2
    """)
    assert list(module.PARAM_SHAPES) == ["enc.W", "enc.b", "out.W", "out.b"]
    assert set(module.init_params()) == set(module.PARAM_SHAPES)

    def forward(p, x):
        return linear(p, "out", linear(p, "enc", torch.tanh(linear(p, "enc", x["x"]))))

    compare(net, module, forward)


def test_two_named_inputs_match_pytorch_and_get_their_gradients():
    net, module = build(MASKED)
    assert module.INPUT_SHAPES == {"x": (4,), "mask": (4,)}
    params = module.init_params()
    x, mask = np.ones((2, 4)), np.zeros((2, 4))
    assert np.all(module.predict(params, x, mask) == params["out.b"])  # masked out: the bias

    def forward(p, x):
        return linear(p, "out", linear(p, "fc", x["x"]) * x["mask"])

    compare(net, module, forward)
    with pytest.raises(ValueError, match="mask has shape"):
        module.forward(params, x, np.zeros((3, 4)))


MASKED = """
    name = "masked"
    loss = "mse"

    [inputs]
    x = [4]
    mask = { features = 4 }

    [[layers]]
    type = "linear"
    name = "fc"
    out = 4

    [[layers]]
    type = "multiply"
    name = "masked"
    inputs = ["fc", "mask"]

    [[layers]]
    type = "linear"
    name = "out"
    out = 3
"""

TIED = """
    name = "tied"
    input = { features = 4 }
    loss = "mse"

    [[layers]]
    type = "linear"
    name = "enc"
    out = 4

    [[layers]]
    type = "tanh"

    [[layers]]
    type = "linear"
    name = "again"
    out = 4
    share = "enc"

    [[layers]]
    type = "concat"
    inputs = ["again", "x"]

    [[layers]]
    type = "linear"
    name = "out"
    out = 2
"""


@pytest.mark.parametrize("toml", [TWO_BRANCH, MASKED, TIED], ids=["fan", "masked", "tied"])
def test_check_follows_the_graph(toml):
    """symbp check's sweep runs the graph: a row for each input's gradient (mask too), fan-out
    sums (x read by enc and by the concat), a shared parameter's sum over its uses."""
    from symbp.checking.gradcheck import check_spec

    net, _ = build(toml)
    report = check_spec(net)
    names = [row.name for row in report.rows]
    assert all(row.passed for row in report.rows), str(report)
    for name in net.inputs:
        assert name in names
    assert len(names) == len(set(names))


def test_the_python_api_declares_the_same_graph():
    """``layer.reads(...)`` and ``layer.sharing(...)`` are the TOML's ``inputs`` and ``share``;
    ``Net(inputs={...})`` its ``[inputs]``."""
    net = symbp.Net(
        [symbp.linear(4, name="fc"), symbp.multiply(name="gated").reads("fc", "mask"),
         symbp.linear(4, name="again").sharing("fc"), symbp.split([1, 3], name="s"),
         symbp.concat(name="cat").reads("s.1", "s.0", "x"), symbp.linear(3, name="out")],
        inputs={"x": (4,), "mask": (4,)}, loss="mse", name="api",
    )
    module = load_module(symbp.codegen(net), "graph_api")
    assert list(module.PARAM_SHAPES) == ["fc.W", "fc.b", "out.W", "out.b"]

    def forward(p, x):
        gated = linear(p, "fc", x["x"]) * x["mask"]
        again = linear(p, "fc", gated)
        return linear(p, "out", torch.cat([again[:, 1:], again[:, :1], x["x"]], dim=1))

    compare(net, module, forward)
    with pytest.raises(symbp.SpecError, match="names a value twice"):
        symbp.add().reads("a", "a")


def test_a_custom_layer_reading_two_values_matches_pytorch():
    """A user-declared layer with two inputs: its stages read each by the value's name (a
    gated sum with a learnable mix), derived like any layer."""
    net, module = build("""
        name = "gated"
        input = { features = 4 }
        loss = "mse"

        [[layers]]
        type = "linear"
        name = "q"
        out = 3

        [[layers]]
        type = "linear"
        name = "k"
        out = 3
        inputs = ["x"]

        [[layers]]
        type = "custom"
        name = "mix"
        inputs = ["q", "k"]
        params = { w = "D" }
        stages = [
            "g[n, j] = 1 / (1 + exp(-k[n, j]))",
            "s[n] = sum(q[n, j] * k[n, j], j)",
            "y[n, j] = g[n, j] * q[n, j] + w[j] * s[n]",
        ]

        [[layers]]
        type = "linear"
        name = "out"
        out = 2
    """)

    def forward(p, x):
        q, k = linear(p, "q", x["x"]), linear(p, "k", x["x"])
        s = (q * k).sum(dim=1, keepdim=True)
        return linear(p, "out", torch.sigmoid(k) * q + p["mix.w"] * s)

    compare(net, module, forward)


def test_a_custom_layer_names_its_arrays_when_the_values_have_no_names():
    net, module = build("""
        name = "halves"
        input = { features = 4 }
        loss = "mse"

        [[layers]]
        type = "split"
        name = "s"
        sizes = [2, 2]

        [[layers]]
        type = "custom"
        name = "prod"
        inputs = ["s.0", "s.1"]
        input_arrays = ["a", "b"]
        stages = ["y[n, j] = a[n, j] * b[n, j] + a[n, j]"]
    """)

    def forward(p, x):
        a, b = x["x"][:, :2], x["x"][:, 2:]
        return a * b + a

    compare(net, module, forward)


def test_the_two_branch_example_matches_pytorch():
    """examples/two_branch.toml: x read twice, enc three times, tied weights, a split gated
    tanh unit."""
    from pathlib import Path

    net = symbp.load_spec(Path(__file__).resolve().parents[1] / "examples" / "two_branch.toml")
    module = load_module(symbp.codegen(net), "graph_two_branch")
    assert "tied.W" not in module.PARAM_SHAPES and "mid.W" in module.PARAM_SHAPES

    def forward(p, x):
        x = x["x"]
        enc = linear(p, "enc", (x @ torch.tanh(x)).reshape(len(x), 16))
        mid = linear(p, "mid", torch.relu(enc))
        join = mid + linear(p, "mid", torch.tanh(enc))
        gtu = torch.tanh(join[:, 4:]) * torch.sigmoid(join[:, :4])
        return linear(p, "out", torch.cat([gtu, enc], dim=1))

    def cross_entropy(out, y):
        return F.cross_entropy(out, y)

    params = random_arrays(module.PARAM_SHAPES, 0)
    x = np.random.default_rng(1).standard_normal((5, 4, 4))
    y = np.array([0, 3, 9, 2, 3])
    ours, grads = module.loss_and_grads(params, x, y)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, "x": x}.items()}
    theirs = cross_entropy(forward(tensors, tensors), torch.tensor(y))
    theirs.backward()
    assert abs(float(ours) - theirs.item()) <= 1e-10
    for key, tensor in tensors.items():
        assert np.max(np.abs(grads[key] - tensor.grad.numpy())) <= 1e-10, key


@pytest.mark.parametrize("toml", [TWO_BRANCH, MASKED, TIED], ids=["fan", "masked", "tied"])
def test_without_wrt_input_the_parameters_gradients_are_the_same(toml):
    """wrt_input=False skips the inputs' gradients (a fan-out of an input is summed only for
    them) and changes no parameter's; float32 inputs compute in float32."""
    net, module = build(toml)
    params = random_arrays(module.PARAM_SHAPES, 3)
    inputs = random_arrays(net.inputs, 4, 2)
    y = np.zeros((2, *net.output_shape))
    _, full = module.loss_and_grads(params, *inputs.values(), y)
    _, some = module.loss_and_grads(params, *inputs.values(), y, wrt_input=False)
    assert set(some) == set(params)
    for key in params:
        assert np.array_equal(some[key], full[key]), key
    small = {k: v.astype(np.float32) for k, v in {**params, **inputs}.items()}
    out, _ = module.forward({k: small[k] for k in params}, *(small[k] for k in inputs))
    assert out.dtype == np.float32


def test_notes_and_flow_of_a_graph_show_the_fan_out_sum(tmp_path, capsys):
    from symbp.cli import main as cli_main

    toml = MASKED.replace('name = "fc"\n    out = 4', 'name = "fc"\n    out = 4\n\n'
                          '    [[layers]]\n    type = "tanh"\n    name = "t"\n'
                          '    inputs = ["x"]\n\n    [[layers]]\n    type = "add"\n'
                          '    name = "both"\n    inputs = ["fc", "t"]')
    toml = toml.replace('inputs = ["fc", "mask"]', 'inputs = ["both", "mask"]')
    net, _ = build(toml)
    text = str(symbp.notes(net, "md"))
    # x (label 0) is read by fc (1) and t (2): its gradient is the sum of their parts
    assert (r"\boldsymbol{\delta}^{(0)} &= \boldsymbol{\delta}^{(0 \leftarrow 1)} + "
            r"\boldsymbol{\delta}^{(0 \leftarrow 2)}") in text
    assert "reverse topological order" in text
    spec = tmp_path / "graph.toml"
    spec.write_text(textwrap.dedent(toml))
    assert cli_main(["flow", str(spec)]) == 0
    out = capsys.readouterr().out
    for name in ("fc", "t", "both", "masked", "out"):  # measured norms per value
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name


IDS_GRAPH = """
    name = "ids_graph"
    loss = "mse"
    weight_decay = 0.05

    [inputs]
    tokens = { ids = 7, shape = [3] }
    x = [3, 4]

    [[layers]]
    type = "embedding"
    name = "emb"
    dim = 4
    inputs = ["tokens"]

    [[layers]]
    type = "tanh"
    name = "gate"

    [[layers]]
    type = "multiply"
    name = "mix"
    inputs = ["gate", "x"]

    [[layers]]
    type = "add"
    name = "both"
    inputs = ["mix", "emb"]

    [[layers]]
    type = "embedding"
    name = "again"
    dim = 4
    inputs = ["tokens"]
    share = "emb"

    [[layers]]
    type = "add"
    name = "join"
    inputs = ["both", "again"]

    [[layers]]
    type = "flatten"

    [[layers]]
    type = "linear"
    name = "fc"
    out = 12

    [[layers]]
    type = "tanh"

    [[layers]]
    type = "linear"
    name = "fc2"
    out = 12
    share = "fc"

    [[layers]]
    type = "linear"
    name = "out"
    out = 2
"""


def test_an_ids_input_with_embeddings_fan_out_and_weight_decay_trains_as_pytorch():
    """Integer ids as a named input read by two embeddings sharing one table, the embedding's
    output read twice (a fan-out), a float input beside it, tied linear layers, weight decay:
    three SGD steps of the generated module against PyTorch's autograd on J = L + s (float64,
    1e-10); the ids get no gradient, the shared weight is decayed once."""
    net, module = build(IDS_GRAPH)
    assert net.ids == {"tokens": 7} and net.decayed == ("fc.W", "out.W")
    assert list(module.PARAM_SHAPES) == ["emb.W", "fc.W", "fc.b", "out.W", "out.b"]
    lam, batch, rate = 0.05, 5, 0.1
    rng = np.random.default_rng(3)
    # weights of about 1/sqrt(fan-in): a loss of order 1, the steps' gradients of order 1
    params = {k: 0.3 * v for k, v in random_arrays(module.PARAM_SHAPES, 4).items()}
    inputs = net.sample_input(rng, batch)
    assert inputs["tokens"].dtype.kind == "i" and inputs["x"].dtype == np.float64
    tokens, x = inputs["tokens"], inputs["x"]
    y = rng.standard_normal((batch, 2))
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}

    def objective(p):
        ids = torch.tensor(tokens)
        emb = p["emb.W"][ids]
        join = torch.tanh(emb) * torch.tensor(x) + emb + p["emb.W"][ids]
        h = torch.tanh(linear(p, "fc", join.reshape(batch, 12)))
        out = linear(p, "out", linear(p, "fc", h))
        decay = lam / 2 * (p["fc.W"].square().sum() + p["out.W"].square().sum())
        return mse(out, torch.tensor(y)) + decay

    for _ in range(3):
        ours, grads = module.loss_and_grads(params, tokens, x, y)
        theirs = objective(tensors)
        theirs.backward()
        assert abs(float(ours) - theirs.item()) <= 1e-10 * max(1.0, abs(theirs.item()))
        assert set(grads) == set(params) | {"x"}  # no gradient for the ids
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected = tensor.grad.numpy()
                scale = max(1.0, float(np.max(np.abs(expected))))
                assert np.max(np.abs(grads[key] - expected)) <= 1e-10 * scale, key
                tensor -= rate * tensor.grad
                tensor.grad = None
        params = {k: v - rate * grads[k] for k, v in params.items()}
    for key, tensor in tensors.items():
        assert np.max(np.abs(params[key] - tensor.detach().numpy())) <= 1e-10, key
    with pytest.raises(ValueError, match="integer ids"):
        module.forward(params, tokens.astype(float), x)
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 7\)"):
        module.loss_and_grads(params, tokens + 7, x, y)
    assert symbp.check(net).passed


@pytest.mark.parametrize("layer, message", [
    ('type = "linear"\nout = 3\ninputs = ["tokens"]',
     "the input 'tokens' is integer ids (ids = 7): only an embedding reads them, not linear"),
    ('type = "embedding"\ndim = 3\ninputs = ["x"]', "embedding reads integer ids"),
])
def test_only_an_embedding_reads_a_named_ids_input(tmp_path, layer, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[inputs]\ntokens = {{ ids = 7 }}\nx = [3]\n[[layers]]\n{layer}\n")
    with pytest.raises(symbp.SpecError, match=re.escape(message)) as raised:
        symbp.load_spec(path)
    assert "field 'type'" in str(raised.value)
    done = subprocess.run([sys.executable, "-m", "symbp", "derive", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
