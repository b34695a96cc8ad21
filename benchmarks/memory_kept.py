"""What backward keeps: the generated module's cache against PyTorch's saved tensors and the
minimum, for every spec in examples/ and the benchmark nets.

    python benchmarks/memory_kept.py [--dtype float64] [--batch 64] [--benchmarks-only]

For each net, one training step's forward pass (float64 by default):

* **generated**: the bytes of the arrays the generated ``forward`` keeps in its ``cache`` for
  ``backward``, each array once: a view (a ReLU's output read from the next convolution's
  zero-padded copy) counts as the array it views (``symbp.flow.memory.measured_bytes``).
* **PyTorch**: the same net in eager PyTorch (same shapes, dtype and parameters), the tensors
  autograd saves for backward, caught with ``torch.autograd.graph.saved_tensors_hooks``: each
  distinct storage once, the parameters' storages left out (the generated cache holds no
  parameter either; both count the network's input where backward reads it). Layers PyTorch
  has no function for are written with torch operations (a custom ``activation``: its sympy
  expression, printed for torch by ``sympy.lambdify``), as a PyTorch user would.
* **minimum**: what the derived backward reads, each array once, in the least bits that
  determine it (``symbp.flow.memory.minimum_bytes``: a float array read whole at full size, a
  padded copy without its zeros, a ReLU's step one bit an element, a max-pooling window's
  arg-max ``ceil(log2(K_h*K_w))`` bits).

The loss is left out on both sides (the generated ``loss_and_grads`` runs its backward at
once). ``conv_vs_numpy.py`` and ``generated_vs_numpy.py`` print the same line for their nets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import symbp  # noqa: E402
from symbp.checking.gradcheck import load_module  # noqa: E402
from symbp.flow.memory import measured_bytes, minimum_bytes  # noqa: E402

MIB = 2**20


class Unsupported(Exception):
    """A layer this PyTorch translation does not run."""


def generated_bytes(module, params, x, seed: int = 0) -> int:
    """Bytes the generated cache keeps after a training forward pass (each array once)."""
    _, cache = module.forward(params, x, train=True, rng=np.random.default_rng(seed))
    return measured_bytes(cache)


def torch_forward(net: symbp.Net, tensors: dict, h, custom=None):
    """``net``'s forward pass (training mode) in eager PyTorch; parameters from ``tensors``;
    ``custom(item, reads, p)``, where given, runs a custom layer (else :class:`Unsupported`)."""
    import sympy as sp
    import torch
    import torch.nn.functional as F

    from symbp.declare.activations import X

    values = {next(iter(net.inputs)): h}  # a graph's values by name

    def run(items):
        for item in items:
            layer, kind = item.layer, item.layer.kind
            reads = [values[v] for v in item.inputs]
            h = reads[0]

            def p(key, name=item.param_owner or item.name):
                return tensors[f"{name}.{key}"]

            if item.body:
                h = h + run(item.body)
            elif kind == "add":
                h = reads[0] + reads[1]
            elif kind == "multiply":
                h = reads[0] * reads[1]
            elif kind == "concat":
                h = torch.cat(reads, dim=-1)
            elif kind == "matmul":
                h = reads[0] @ reads[1]
            elif kind == "split":  # one part
                h = h[..., layer.start:layer.start + layer.width]
            elif kind == "linear":
                h = h @ p("W") + p("b") if layer.bias else h @ p("W")
            elif kind == "conv2d":
                h = F.conv2d(h, p("W"), p("b") if layer.bias else None, stride=layer.stride,
                             padding=layer.padding, dilation=layer.dilation)
            elif kind == "conv_transpose2d":
                h = F.conv_transpose2d(h, p("W"), p("b") if layer.bias else None,
                                       stride=layer.stride, padding=layer.padding,
                                       output_padding=layer.output_padding)
            elif kind == "batchnorm":
                h = F.batch_norm(h, None, None, p("gamma"), p("beta"), training=True,
                                 eps=layer.eps)
            elif kind == "maxpool2d":
                h = F.max_pool2d(h, layer.kernel, layer.stride)
            elif kind == "avgpool2d":
                h = F.avg_pool2d(h, layer.kernel, layer.stride, layer.padding)
            elif kind == "flatten":
                h = h.flatten(1)
            elif kind == "embedding":
                h = F.embedding(h, p("W"))
            elif kind == "prelu":
                h = F.prelu(h, p("alpha").reshape(-1))
            elif kind == "leaky_relu":
                h = F.leaky_relu(h, layer.slope)
            elif kind == "elu":
                h = F.elu(h, layer.alpha)
            elif kind == "rrelu":
                h = F.rrelu(h, layer.lower, layer.upper, training=True)
            elif kind in ("relu", "sigmoid", "tanh"):
                h = getattr(torch, kind)(h)
            elif kind in ("gelu", "silu", "softplus"):
                h = getattr(F, kind)(h)
            elif kind == "layer_norm":  # over gamma's shape: a sample's, or a position's
                h = F.layer_norm(h, tuple(p("gamma").shape), p("gamma"), p("beta"),
                                 eps=layer.eps)
            elif kind == "attention":  # symbp's weights per head: (D, heads, width / heads)
                batch, length, _ = h.shape
                width = p("bq").numel()
                q, k, v = (
                    (h @ p(f"W{w}").reshape(-1, width) + p(f"b{w}").reshape(width))
                    .reshape(batch, length, layer.heads, -1).transpose(1, 2)
                    for w in "qkv"
                )
                context = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)
                h = (context.transpose(1, 2).reshape(batch, length, width)
                     @ p("Wo").reshape(width, -1) + p("bo"))
            elif kind == "rnn":  # nn.RNN's own kernel (tanh, one layer, batch first, h0 = 0)
                weights = [p("W_ih"), p("W_hh"), p("b_ih"), p("b_hh")]
                zero = h.new_zeros(1, h.shape[0], layer.hidden)
                h = torch._VF.rnn_tanh(h, zero, weights, True, 1, 0.0, True, False, True)[0]
                h = h if layer.sequence else h[:, -1]
            elif kind == "lstm":  # nn.LSTM's own kernel (one layer, batch first, h0 = c0 = 0)
                weights = [p("W_ih"), p("W_hh"), p("b_ih"), p("b_hh")]
                zero = h.new_zeros(1, h.shape[0], layer.hidden)
                h = torch._VF.lstm(h, (zero, zero), weights, True, 1, 0.0, True, False, True)[0]
                h = h if layer.sequence else h[:, -1]
            elif kind == "group_norm":
                h = F.group_norm(h, layer.groups, p("gamma"), p("beta"), eps=layer.eps)
            elif kind in ("softmax", "log_softmax"):
                h = getattr(F, kind)(h, dim=1)
            elif kind == "global_avgpool":
                h = h.mean(dim=(2, 3))
            elif kind == "dropout":
                h = F.dropout(h, layer.p, training=True)
            elif kind == "activation":
                h = sp.lambdify(X, layer.expression(), "torch")(h)
            elif kind == "custom" and custom is not None:
                h = custom(item, reads, p)
            else:
                raise Unsupported(kind)
            values[item.name] = h
        return h

    return run(net.placed)


def torch_bytes(net: symbp.Net, params: dict, x: np.ndarray) -> int | None:
    """Bytes of the tensors PyTorch's autograd saves for ``net``'s backward (each storage once,
    parameters aside); None without PyTorch. Raises :class:`Unsupported` for a layer it lacks."""
    try:
        import torch
    except ImportError:
        return None
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    return saved_bytes(lambda: torch_forward(net, tensors, torch.tensor(x)), tensors.values())


def saved_bytes(function, params) -> int:
    """Bytes of the tensors autograd saves while ``function()`` runs forward (each storage
    once, the parameters' storages aside)."""
    import torch

    own = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = function()
    del out
    return sum(saved.values())


def measure(net: symbp.Net, batch: int, dtype, seed: int = 0) -> dict:
    """The three figures for ``net`` at ``batch`` (bytes; ``pytorch`` None or a note)."""
    module = load_module(symbp.codegen(net))
    params = module.init_params(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    x = net.sample_input(rng, batch)  # ids stay integers
    x = x if net.input_ids is not None else x.astype(dtype)
    row = dict(generated=generated_bytes(module, params, x, seed),
               minimum=minimum_bytes(net, batch, dtype))
    try:
        row["pytorch"] = torch_bytes(net, params, x)
    except Unsupported as kind:
        row["pytorch"] = f"PyTorch has no {kind} here"
    return row


def line(label: str, row: dict) -> str:
    """``kept for backward: generated 114.8 MiB, PyTorch 145.5 MiB, minimum 106.3 MiB``."""
    torch_text = ("PyTorch not installed" if row["pytorch"] is None
                  else row["pytorch"] if isinstance(row["pytorch"], str)
                  else f"PyTorch {row['pytorch'] / MIB:.2f} MiB")
    return (f"{label}: kept for backward: generated {row['generated'] / MIB:.2f} MiB, "
            f"{torch_text}, minimum {row['minimum'] / MIB:.2f} MiB")


def benchmark_nets() -> list[tuple[str, symbp.Net, int]]:
    """The nets of conv_vs_numpy.py and generated_vs_numpy.py, at their batch sizes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import conv_vs_numpy
    import generated_vs_numpy
    import reference_mlp

    from symbp.declare.spec import parse_spec

    nets = [(f"conv_vs_numpy {name}", parse_spec(conv_vs_numpy.spec_text(name)),
             conv_vs_numpy.SHAPES[name][1]) for name in ("lenet", "wide")]
    nets.append(("generated_vs_numpy mlp", generated_vs_numpy.reference_net(),
                 reference_mlp.make_batch.__defaults__[2]))
    return nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--batch", type=int, default=64, help="for the examples (default 64)")
    parser.add_argument("--benchmarks-only", action="store_true")
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype).type
    nets = [] if args.benchmarks_only else [
        (f"examples/{spec.name}", symbp.load_spec(spec), args.batch)
        for spec in sorted((ROOT / "examples").glob("*.toml"))
    ]
    nets += benchmark_nets()
    print(f"{'net':<32}{'batch':>6}{'generated':>12}{'PyTorch':>12}{'minimum':>12}  (MiB, "
          f"{args.dtype})")
    worse = []
    for label, net, batch in nets:
        row = measure(net, batch, dtype)
        torch_value = row["pytorch"]
        torch_text = (f"{torch_value / MIB:12.3f}" if isinstance(torch_value, int)
                      else f"{'-':>12}")
        note = f"  ({torch_value})" if isinstance(torch_value, str) else ""
        print(f"{label:<32}{batch:>6}{row['generated'] / MIB:12.3f}{torch_text}"
              f"{row['minimum'] / MIB:12.3f}{note}", flush=True)
        if isinstance(torch_value, int) and row["generated"] > torch_value:
            worse.append(label)
    if worse:
        print(f"keeps more than PyTorch: {', '.join(worse)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
