"""The PyTorch target against the same network in eager PyTorch (issue 26, part 4).

    python benchmarks/torch_target.py [--device cpu|cuda] [--repeats 7] [--threads 1 2]
                                      [--dtypes float32 float64] [--nets lenet wide mlp]
                                      [--compile] [--memory-only]

**Training step** (forward, cross-entropy, backward, SGD update) of the module
``symbp codegen --target torch`` writes, against the same net written with torch operations
(``benchmarks/memory_kept.py``'s ``torch_forward``: ``F.conv2d``, ``F.batch_norm``,
``F.max_pool2d``, ``@`` ...; eager autograd), for the reference MLP of
``generated_vs_numpy.py`` and both nets of ``conv_vs_numpy.py``, at their batch sizes: the two
are timed in alternating blocks (``reference_mlp.time_in_blocks``), with ``torch.set_num_threads``
1 and 2 on the CPU. The ratio is target / eager (goal: at most 1.0x), of wall time and of the
process's CPU time. ``--compile`` adds rows for ``torch.compile`` of the generated module against
eager and against ``torch.compile`` of the eager net.

**Saved for backward** (float64, batch 16) for every example: the bytes of the tensors each
side saves for backward, caught with ``torch.autograd.graph.saved_tensors_hooks`` (each
storage once, parameters aside), the target's against eager autograd's. A layer PyTorch has
no function for (a ``custom`` layer) runs on the eager side as the torch operations its
stages print to (the target's own ``<stem>_forward``), recorded by autograd.

**Activations** (float64, a 256 x 256 input): the bytes the target's ``autograd.Function``
saves for mish, SiLU, GELU and each user expression in ``examples/*.toml``, against autograd
of the same expression written with torch operations (the layer's sympy expression through
``sympy.lambdify``, and the form people write, ``x*torch.tanh(F.softplus(x))``) and against
PyTorch's native op where there is one (``F.mish``, ``F.silu``, ``F.gelu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sympy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import memory_kept  # noqa: E402
import torch  # noqa: E402

import symbp  # noqa: E402
from symbp.declare.activations import X  # noqa: E402
from symbp.declare.base import REGISTRY  # noqa: E402
from symbp.derivation.plan import build_plan  # noqa: E402
from symbp.emit.module import function_stems  # noqa: E402
from symbp.emit.torch_module import camel  # noqa: E402
from symbp.naming import forward_function  # noqa: E402


def load_target(net, folder: Path):
    """The generated torch module for ``net`` (loaded from a file in ``folder``)."""
    path = folder / f"{net.name}_torch.py"
    path.write_text(symbp.codegen(net, target="torch"))
    spec = importlib.util.spec_from_file_location(f"{net.name}_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(net, module, dtype, device, batch, compiled=False):
    """(target step, eager step): each one SGD step on the same batch and parameters."""
    model = getattr(module, camel(net.name))(seed=0, dtype=dtype, device=device)
    tensors = {k: v.detach().clone().requires_grad_(True)
               for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    shape = (batch, *module.INPUT_SHAPE)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    y = torch.randint(0, net.output_shape[0], (batch,), generator=generator).to(device)
    lr = 1e-3
    run = torch.compile(model) if compiled else model
    forward = (torch.compile(lambda h: memory_kept.torch_forward(net, tensors, h)) if compiled
               else lambda h: memory_kept.torch_forward(net, tensors, h))

    def sgd(params):
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None

    def target():
        torch.nn.functional.cross_entropy(run(x), y).backward()
        sgd(model.parameters())

    def eager():
        out = forward(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        sgd(tensors.values())

    return target, eager


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(first, second, device, repeats: int, block: int = 3):
    """Medians (s) of ``first`` and ``second`` over ``repeats`` alternating blocks of
    ``block`` calls, the median of the block-by-block ratios, and the same ratio of the
    process's CPU time (all threads: on a shared machine the steadier figure)."""
    for f in (first, second):
        f()
        f()
    times: tuple[list, list] = ([], [])
    cpu: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for k, f in enumerate((first, second)):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(block):
                f()
            _sync(device)
            times[k].append((time.perf_counter() - start) / block)
            cpu[k].append((time.process_time() - start_cpu) / block)
    ratio = statistics.median(a / b for a, b in zip(*times, strict=True))
    cpu_ratio = statistics.median(a / b for a, b in zip(*cpu, strict=True))
    return statistics.median(times[0]), statistics.median(times[1]), ratio, cpu_ratio


def benchmark_nets(names=None):
    """The benchmarked nets, those whose label ends in one of ``names`` (all: None)."""
    return [row for row in memory_kept.benchmark_nets()
            if names is None or row[0].split()[-1] in names]


def training_rows(args, folder: Path) -> None:
    print(f"training step, target / eager ({args.device}; torch {torch.__version__})")
    print(f"{'net':<26}{'dtype':>8}{'threads':>8}{'target ms':>11}{'eager ms':>10}{'ratio':>8}"
          f"{'cpu ratio':>11}")
    for label, net, batch in benchmark_nets(args.nets):
        module = load_target(net, folder)
        for name in args.dtypes:
            dtype = getattr(torch, name)
            for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                target, eager = _steps(net, module, dtype, args.device, batch)
                t, e, ratio, cpu = time_pair(target, eager, args.device, args.repeats)
                print(f"{label:<26}{name:>8}{threads:>8}{t * 1e3:>11.2f}{e * 1e3:>10.2f}"
                      f"{ratio:>7.2f}x{cpu:>10.2f}x", flush=True)
                if args.compile:  # the compiled target against eager, then compiled eager
                    compiled, compiled_eager = _steps(net, module, dtype, args.device, batch,
                                                      compiled=True)
                    for other, title in ((eager, "compiled / eager"),
                                         (compiled_eager, "compiled / compiled")):
                        t, e, ratio, cpu = time_pair(compiled, other, args.device, args.repeats)
                        print(f"{'  ' + title:<26}{name:>8}{threads:>8}{t * 1e3:>11.2f}"
                              f"{e * 1e3:>10.2f}{ratio:>7.2f}x{cpu:>10.2f}x", flush=True)


def stages_in_torch(net, module):
    """For ``memory_kept.torch_forward``: a layer PyTorch has no function for (a custom one),
    run as the torch operations its stages print to (the generated ``<stem>_forward``)."""
    plan = build_plan(net)
    stems = function_stems(net)

    def run(item, reads, p):
        step = plan.step(item.name)
        forward = getattr(module, forward_function(stems[item.name]))
        params = [p(a.name) for a in step.derivation.form.params]
        return forward(*reads, *params, **step.constants())[0]

    return run


def memory_rows(args, folder: Path) -> int:
    print(f"\nsaved for backward (float64, batch {args.batch}; bytes), target vs eager autograd")
    print(f"{'net':<34}{'target':>12}{'eager':>12}{'ratio':>8}")
    worse = []
    nets = [(f"examples/{p.stem}", symbp.load_spec(p), args.batch)
            for p in sorted((ROOT / "examples").glob("*.toml"))]
    for label, net, batch in nets + benchmark_nets():
        try:
            module = load_target(net, folder)
        except symbp.SpecError as refused:  # a layer the target cannot print yet
            print(f"{label:<34}  ({refused.message})")
            continue
        model = getattr(module, camel(net.name))(seed=0, dtype=torch.float64)
        tensors = {k: v.detach().clone().requires_grad_(True)
                   for k, v in model.named_parameters()}
        x = net.sample_input(np.random.default_rng(0), batch)
        x = torch.as_tensor(x if net.input_ids is not None else x.astype(np.float64))
        target = memory_kept.saved_bytes(lambda: model(x), list(model.parameters()))  # noqa: B023
        try:
            eager = memory_kept.saved_bytes(
                lambda: memory_kept.torch_forward(  # noqa: B023
                    net, tensors, x, custom=stages_in_torch(net, module)),  # noqa: B023
                list(tensors.values()))
        except memory_kept.Unsupported as kind:
            print(f"{label:<34}{target:>12}  (PyTorch has no {kind})")
            continue
        if target > eager:
            worse.append(label)
        print(f"{label:<34}{target:>12}{eager:>12}{target / eager:>7.2f}x", flush=True)
    if worse:
        print(f"the target saves more than autograd for: {', '.join(worse)}")
    return 0


def activations() -> list[tuple[str, object, list]]:
    """(label, layer, [(baseline label, torch function)]): mish, SiLU, GELU and each user
    expression of examples/*.toml, with the torch forms autograd is compared on."""
    import torch.nn.functional as F

    rows = [
        ("mish", symbp.declare.activations.Activation("x*tanh(log(1 + exp(x)))"),
         [("x*tanh(softplus(x))", lambda x: x * torch.tanh(F.softplus(x))),
          ("F.mish (native)", F.mish)]),
        ("silu", REGISTRY["silu"](),
         [("x*sigmoid(x)", lambda x: x * torch.sigmoid(x)), ("F.silu (native)", F.silu)]),
        ("gelu", REGISTRY["gelu"](),
         [("x*(1 + erf(x/sqrt(2)))/2", lambda x: x * (1 + torch.erf(x / 2**0.5)) / 2),
          ("F.gelu (native)", F.gelu)]),
    ]
    seen = set()
    for path in sorted((ROOT / "examples").glob("*.toml")):
        for item in symbp.load_spec(path).walk():
            layer = item.layer
            if layer.kind == "activation" and layer.text not in seen:
                seen.add(layer.text)
                rows.append((f"{path.stem}: {layer.text}", layer, []))
    return rows


def activation_bytes(layer, folder: Path, shape=(256, 256)) -> dict[str, int]:
    """Saved bytes of the target's activation and of each torch form on one input."""
    net = symbp.Net([layer], input_features=shape[-1], name=f"{layer.kind}_alone")
    module = load_target(net, folder)
    model = getattr(module, camel(net.name))()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    # numbers such as sqrt(2) as floats: torch.sqrt takes tensors only
    numbers = layer.expression().replace(lambda e: e.is_number and not e.is_Atom,
                                         lambda e: sympy.Float(e.evalf()))
    expression = sympy.lambdify(X, numbers, "torch")
    return dict(target=memory_kept.saved_bytes(lambda: model(x), []),
                autograd=memory_kept.saved_bytes(lambda: expression(x), []),
                x=x.numel() * x.element_size())


def activation_rows(folder: Path) -> None:
    print("\nactivations: saved for backward (float64, a 256 x 256 input; bytes)")
    print(f"{'activation / torch form under autograd':<46}{'target':>10}{'other':>10}"
          f"{'ratio':>8}")
    for label, layer, forms in activations():
        found = activation_bytes(layer, folder)
        x = torch.randn(256, 256, dtype=torch.float64, requires_grad=True)
        others = [("its sympy expression in torch ops", found["autograd"])]
        others += [(name, memory_kept.saved_bytes(lambda f=f, x=x: f(x), [])) for name, f in forms]
        print(f"{label:<46}{found['target']:>10}")
        for name, value in others:
            print(f"{'  vs ' + name:<46}{found['target']:>10}{value:>10}"
                  f"{found['target'] / value:>7.2f}x", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=16, help="for the memory table")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile the target (and the eager net): rows for both")
    parser.add_argument("--nets", nargs="+", choices=["lenet", "wide", "mlp"],
                        help="the training-step nets (default: all three)")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"torch_target.py: --device {args.device}: no CUDA device here (torch "
              f"{torch.__version__}); run on a machine with a GPU, or leave --device cpu",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and not args.device.startswith("cuda"):
        print(f"torch_target.py: --device {args.device}: cpu or cuda[:N]", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="symbp-torch-") as folder:
        if not args.memory_only:
            training_rows(args, Path(folder))
        memory_rows(args, Path(folder))
        activation_rows(Path(folder))
        return 0


if __name__ == "__main__":
    sys.exit(main())
