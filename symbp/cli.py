"""The ``symbp`` command line: derive, codegen, check, latex, graph, flow.

Exit codes: 0 success, 1 a check or proof failed, 2 bad input (one line on stderr, no traceback);
141 when the reader of the output goes away (`symbp derive SPEC | head`), as for SIGPIPE.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SpecError, SymbpError
from .version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is one line on stderr (exit 2), as bad specs
    are: argparse's own error prints the whole usage first. Subcommands get this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from .flow.command import add_flow_parser, seed_argument

    parser = _Parser(
        prog="symbp", description="Derive backpropagation exactly, generate numpy, export notes."
    )
    parser.add_argument("--version", action="version", version=f"symbp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    derive = commands.add_parser("derive", help="print forward and derived backward formulas")
    derive.add_argument("spec", nargs="?", help="a TOML network spec")
    derive.add_argument("--layer", help="only this layer")
    derive.add_argument("--expr", help="derive one activation given as an expression in x")
    derive.add_argument(
        "--verify",
        action="store_true",
        help="prove each formula by scalar expansion (each verdict printed as it is proved; "
        "progress of a proof longer than 3 s on stderr)",
    )
    derive.add_argument("--ascii", action="store_true", help="ASCII instead of Unicode output")

    codegen = commands.add_parser(
        "codegen", help="write a numpy (or torch, or jax) module for a spec"
    )
    codegen.add_argument("spec", nargs="?")
    codegen.add_argument("--expr", help="torch target: one activation, an expression in x")
    codegen.add_argument(
        "-o", "--output", required=True, help="the .py file to write ('-': stdout)"
    )
    codegen.add_argument(
        "--target", choices=("numpy", "torch", "jax"), default="numpy",
        help="what the module runs on: numpy (the default), torch (torch.autograd.Function per "
        "layer math, an nn.Module) or jax (jax.custom_vjp functions, init and apply)",
    )

    check = commands.add_parser("check", help="check generated gradients by finite differences")
    check.add_argument("spec")
    check.add_argument("--batch", type=int, default=4, help="batch size of the inputs (4)")
    check.add_argument(
        "--seed", type=seed_argument, default=0, help="seed of the parameters and inputs (0)"
    )
    check.add_argument("--full", action="store_true", help="every entry, not a sample")

    latex = commands.add_parser("latex", help="export the derivation as LaTeX or Markdown notes")
    latex.add_argument("spec")
    latex.add_argument("-o", "--output", required=True, help=".tex or .md file ('-': stdout)")
    latex.add_argument("--format", choices=("tex", "md"))
    latex.add_argument("--steps", action="store_true", help="include intermediate steps")
    latex.add_argument("--notation", choices=("d2l", "cs231n"), default="d2l")
    latex.add_argument(
        "--fragment", action="store_true", help="no preamble or title, to include in a document"
    )
    latex.add_argument(
        "--flow", action="store_true", help="add the gradient-flow bounds (symbp flow)"
    )
    latex.add_argument(
        "--numbering",
        choices=("all", "params"),
        default="all",
        help="number every layer (all) or only the layers with parameters (params: W^(2) is "
        "the second weight layer, a layer without parameters is 1', 1'', ...)",
    )
    latex.add_argument("--graph", action="store_true", help="include the computational graph "
                       "(a TikZ figure, as symbp graph draws it; .tex only)")

    graph = commands.add_parser("graph", help="draw the computational graph of the plan")
    graph.add_argument("spec")
    graph.add_argument("-o", "--output", required=True,
                       help=".svg, .png, .pdf (graphviz), .dot (its source) or .tex (TikZ)")
    graph.add_argument("--params", action="store_true", help="draw the parameters too")
    graph.add_argument("--example", action="store_true", help="annotate one sample's forward "
                       "values (green) and gradients (red) on each edge")
    graph.add_argument("--seed", type=seed_argument, default=0,
                       help="seed of the example's parameters and input (0)")

    add_flow_parser(commands)
    return parser


def _write(path: str, text: str) -> None:
    """Write an output file; a path that cannot be written is bad input, not a traceback."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot write {path}: {err.strerror or err}", field="-o") from None
    print(f"wrote {path}")


def _refuse_overwriting_the_spec(args: argparse.Namespace) -> None:
    """An output file (``-o``, ``--plot``) that is the spec itself would replace the spec."""
    spec = getattr(args, "spec", None)
    for option, name in (("-o", "output"), ("--plot", "plot")):
        target = getattr(args, name, None)
        if spec and target and target != "-" and _same_file(spec, target):
            raise SpecError(
                "is the spec file itself, which it would overwrite", file=spec, field=option
            )


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)  # hard and symbolic links too
    except OSError:  # one does not exist (yet)
        return Path(first).resolve() == Path(second).resolve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _refuse_overwriting_the_spec(args)
        if args.command == "derive":
            return _derive(args)
        if args.command == "codegen":
            return _codegen(args)
        if args.command == "check":
            return _check(args)
        if args.command == "latex":
            return _latex(args)
        if args.command == "graph":
            return _graph(args)
        if args.command == "flow":
            from .flow.command import run_flow

            return run_flow(args)
    except SymbpError as err:
        print(f"symbp: error: {err}", file=sys.stderr)
        return 2
    except MemoryError as err:  # sizes or a --batch that the arrays cannot be allocated for
        print(f"symbp: error: {_memory_error(err, args)}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not str(err).startswith(TOO_BIG_FOR_NUMPY):  # a bug: its traceback is wanted
            raise
        # NumPy's word for an array of more bytes than an address holds: a --batch of 10**16
        print(f"symbp: error: {_memory_error(MemoryError(str(err)), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:
        # The reader went away (`symbp derive SPEC | head`). Python's documented recipe: point
        # stdout at devnull so that the exit's flush cannot fail too; exit as a SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


#: how NumPy's ValueErrors begin for an array whose size does not fit in an address
TOO_BIG_FOR_NUMPY = ("array is too big", "Maximum allowed dimension exceeded")
#: the options whose value is a batch size, per command
BATCH_OPTIONS = {"check": ("batch",), "flow": ("grad_batch", "jacobian_batch", "batch")}


def _memory_error(err: MemoryError, args: argparse.Namespace) -> SpecError:
    """A MemoryError as bad input naming the spec, the option whose value was too large and
    the layer whose array could not be allocated, as far as NumPy's message (``Unable to
    allocate 8.53 PiB for an array with shape (100000000000000, 12) ...``) tells them."""
    from .declare.spec import load_spec

    text = str(err) or "an allocation failed"
    spec = getattr(args, "spec", None)
    match = re.search(r"with shape \(([0-9, ]*)\)", text)
    shape = tuple(int(part) for part in match.group(1).split(",") if part.strip()) if match else ()
    option = None
    for name in BATCH_OPTIONS.get(args.command, ()):
        value = getattr(args, name, None)
        values = [value] if isinstance(value, int) else _batches(value)
        if (shape and shape[0] in values) or (not shape and len(BATCH_OPTIONS[args.command]) == 1):
            option = "--" + name.replace("_", "-")
            break
    layer = whose = None
    try:
        net = load_spec(spec) if spec else None
    except SymbpError:
        net = None
    if net is not None and shape:
        layer, whose = _array_owner(net, shape, batched=option is not None)
    message = f"not enough memory{f' for {whose}' if whose else ''}: {text}"
    return SpecError(message, file=spec, layer=layer, field=option)


def _batches(text) -> list[int]:
    try:
        return [int(part) for part in str(text).split(",")]
    except ValueError:
        return []


def _array_owner(net, shape: tuple[int, ...], *, batched: bool) -> tuple[str | None, str | None]:
    """Which layer's array has ``shape``: a parameter, or (``batched``: the batch first) the
    input, a layer's output or a padded input; ``(layer name, what)``, Nones if none."""
    per_sample = shape[1:] if batched else None
    if per_sample == net.input_shape:
        return None, "the input x"
    for item in net.walk():
        if not batched:
            for param, param_shape in item.layer.param_shapes(item.in_shape).items():
                if tuple(param_shape) == shape:
                    return item.name, f"its parameter {param} {list(shape)}"
            continue
        if per_sample == item.out_shape:
            return item.name, "its output"
        padding = getattr(item.layer, "padding", 0)
        if padding and len(item.in_shape) == 3:
            channels, height, width = item.in_shape
            if per_sample == (channels, height + 2 * padding, width + 2 * padding):
                return item.name, "its padded input"
    return None, None


def _derive(args) -> int:
    import shutil

    from .declare.layers import Activation
    from .declare.spec import load_spec
    from .emit.pretty import Progress, derivation_blocks, expression_blocks
    from .errors import SpecError

    progress = Progress(sys.stderr) if args.verify else None
    if args.expr is not None:
        if args.spec:
            raise SpecError("give either a spec or --expr, not both")
        if args.layer:
            raise SpecError(
                "names a layer of a spec; --expr derives one activation", field="--layer"
            )
        try:
            layer = Activation(args.expr)
        except SpecError as err:  # the option names the text, not the layer field 'expr'
            raise SpecError(err.message, field="--expr") from None
        report = expression_blocks(
            layer, verify=args.verify, unicode=not args.ascii, progress=progress
        )
    else:
        if not args.spec:
            raise SpecError("give a spec file or --expr")
        net = load_spec(args.spec)
        if args.layer is not None:
            try:
                net.find(args.layer)
            except SpecError as err:
                raise SpecError(err.message, file=args.spec, field="--layer") from None
        report = derivation_blocks(
            net, layer=args.layer, verify=args.verify, unicode=not args.ascii, progress=progress
        )
    # The terminal's width: COLUMNS, else the terminal's own, else 80 (not a terminal).
    width = shutil.get_terminal_size().columns
    for line in report.lines(width):
        print(line, flush=True)  # each line as it is ready: a proof's verdict when proved
    return 0 if report.ok else 1


def _codegen(args) -> int:
    from .declare.spec import load_spec
    from .emit.module import generate_module
    from .errors import SpecError

    if (args.spec is None) == (args.expr is None):
        raise SpecError("give either a spec or --expr")
    if args.target == "torch":
        from .emit.torch_module import (
            generate_torch_activation,
            generate_torch_module,
            require_torch,
        )

        require_torch()
        if args.expr is not None:
            source = generate_torch_activation(args.expr)
        else:
            source = generate_torch_module(load_spec(args.spec))
    elif args.expr is not None:
        raise SpecError("--expr writes a torch module: add --target torch", field="--expr")
    elif args.target == "jax":
        from .emit.jax_module import generate_jax_module

        source = generate_jax_module(load_spec(args.spec))
    else:
        source = generate_module(load_spec(args.spec))
    if args.output == "-":
        sys.stdout.write(source)
    else:
        _write(args.output, source)
    return 0


def _check(args) -> int:
    from .checking.gradcheck import check_spec
    from .declare.spec import load_spec
    from .errors import SpecError

    net = load_spec(args.spec)
    try:
        report = check_spec(net, batch=args.batch, seed=args.seed, full=args.full)
    except SpecError as err:
        if err.field in ("batch", "seed"):  # the arguments' names on this command line
            raise SpecError(err.message, file=args.spec, field=f"--{err.field}") from None
        raise
    print(report.table())
    return 0 if report.passed else 1


def _latex(args) -> int:
    from .declare.spec import load_spec
    from .derivation.network import derive_network
    from .emit.notes import render_notes
    from .errors import SpecError

    fmt = args.format
    if fmt is None:
        suffix = Path(args.output).suffix.lower()
        fmt = {".tex": "tex", ".md": "md", ".markdown": "md"}.get(suffix)
        if fmt is None:
            raise SpecError(
                "cannot tell the format from the file name; use --format tex|md", field="-o"
            )
    derivation = derive_network(load_spec(args.spec))
    flow = None
    if args.flow:
        from .flow.chain import flow_bounds

        flow = flow_bounds(derivation)
    graph = None
    if args.graph:
        if fmt != "tex":
            raise SpecError("the graph is a TikZ figure: LaTeX notes only", field="--graph")
        from .derivation.plan import build_plan
        from .emit.drawing import build_drawing, render_tikz

        graph = render_tikz(build_drawing(build_plan(derivation.net, derivation)),
                            standalone=False)
    text = render_notes(
        derivation,
        graph=graph,
        fmt=fmt,
        steps=args.steps,
        notation=args.notation,
        fragment=args.fragment,
        flow=flow,
        numbering=args.numbering,
    )
    if args.output == "-":
        sys.stdout.write(text)
    else:
        _write(args.output, text)
    return 0


def _graph(args) -> int:
    from .declare.spec import load_spec
    from .derivation.plan import build_plan
    from .emit.drawing import build_drawing, render_graph

    net = load_spec(args.spec)
    example = None
    if args.example:
        from .checking.example import run_example

        example = run_example(net, seed=args.seed)
    drawing = build_drawing(build_plan(net), params=args.params, example=example)
    data = render_graph(drawing, Path(args.output).suffix)
    try:
        Path(args.output).write_bytes(data)
    except OSError as err:
        raise SpecError(f"cannot write {args.output}: {err.strerror or err}", field="-o") from None
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
