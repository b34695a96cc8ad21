"""``symbp flow SPEC``: the gradient-flow report on the command line, and its figure.

:func:`add_flow_parser` adds the subcommand to the CLI's subparsers; :func:`run_flow` runs it
and returns the exit status. The report has three tables: the symbolic one (local Jacobians,
proved bounds, the bound on the whole chain), the numerical one (gradient norms at
initialization, the bounds evaluated there, Jacobian singular values for small widths) and the
memory one (what backward keeps, as a formula in N, against the measured cache, for each
``--batch``). ``--plot FILE`` draws the gradient norm per layer (log scale) with matplotlib, the
optional ``plot`` extra, imported only then.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

import sympy as sp

from ..emit.layout import FormulaPrinter
from ..errors import SpecError, SymbpError


def seed_argument(text: str) -> int:
    """A ``--seed``: NumPy's generators take non-negative integers."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def add_flow_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``flow`` to the CLI's subparsers (the object ``add_subparsers`` returned)."""
    flow = subparsers.add_parser(
        "flow", help="gradient flow: Jacobian bounds, gradient norms, activation memory"
    )
    flow.add_argument("spec", help="a TOML network spec")
    flow.add_argument(
        "--batch",
        default="1,32,256",
        help="batch sizes for the memory table, comma-separated (default 1,32,256)",
    )
    flow.add_argument(
        "--seed", type=seed_argument, default=0, help="seed of the parameters and the batch"
    )
    flow.add_argument(
        "--grad-batch", type=int, default=32, help="batch size for the gradient norms (32)"
    )
    flow.add_argument(
        "--jacobian-batch",
        type=int,
        default=4,
        help="batch size for the Jacobian singular values (4; 0 skips them)",
    )
    flow.add_argument("--dtype", choices=("float32", "float64"), help="for the memory table")
    flow.add_argument(
        "--plot", metavar="FILE", help="write the gradient-norm figure (PNG, PDF, SVG)"
    )
    flow.set_defaults(handler=run_flow)
    return flow


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(
            f"must be integers separated by commas, got {text!r}", field="--batch"
        ) from None
    if not batches or min(batches) < 1:
        raise SpecError(f"must be positive integers, got {text!r}", field="--batch")
    return batches


def run_flow(args: argparse.Namespace) -> int:
    """Print the three tables for ``args.spec``; write the figure when ``--plot`` is given.

    Returns 0; 1 when the generated module cannot be built for the network (the symbolic table
    and the memory formula are still printed) or a measured cache differs from the formula.
    """
    from ..declare.spec import load_spec
    from ..derivation.network import derive_network
    from .chain import flow_bounds
    from .memory import memory_model
    from .numeric import measure
    from .recurrent import bound_text, over_time, over_time_table, recurrent_bound

    batches = parse_batches(args.batch)
    if args.grad_batch < 2:
        raise SpecError(f"must be at least 2, got {args.grad_batch}", field="--grad-batch")
    if args.jacobian_batch < 0:
        raise SpecError(f"must be 0 or more, got {args.jacobian_batch}", field="--jacobian-batch")
    if args.plot:
        _check_plot_path(args.plot)
        _require_matplotlib()
    net = load_spec(args.spec)
    dtype = args.dtype or net.dtype
    derivation = derive_network(net)
    rows = flow_bounds(derivation)
    print(symbolic_table(rows))
    print()
    for item in derivation.layers:
        if item.derivation.cell is not None:  # unrolled over time: the bound over t
            print("\n".join(bound_text(recurrent_bound(item))))
            print()
    model = memory_model(net)
    module, failure = _generated_module(net)
    if module is None:
        print(f"Numerical table skipped: no generated module for this network ({failure}).")
        print()
        print(memory_table(net, model, batches, dtype, seed=args.seed, module=None))
        return 1
    measured = measure(
        net,
        rows,
        batch=args.grad_batch,
        seed=args.seed,
        jacobian_batch=args.jacobian_batch,
        module=module,
    )
    print(numeric_table(measured, seed=args.seed))
    print()
    differs = False
    for result in over_time(net, derivation, batch=args.grad_batch, seed=args.seed,
                            module=module):
        table = over_time_table(result, seed=args.seed, batch=args.grad_batch)
        differs = differs or "DIFFERS" in table
        print(table)
        print()
    text = memory_table(net, model, batches, dtype, seed=args.seed, module=module)
    print(text)
    if args.plot:
        plot_flow(measured, args.plot, title=f"{net.name}: gradient norms at initialization")
        print(f"\nwrote {args.plot}")
    return 1 if differs or "DIFFERS" in text else 0


def _check_plot_path(path: str) -> None:
    target = Path(path)
    if target.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise SpecError(f"must end in .png, .pdf or .svg, got {path!r}", field="--plot")
    if not target.parent.is_dir():
        raise SpecError(f"folder {str(target.parent)!r} does not exist", field="--plot")
    if target.is_dir():
        raise SpecError(f"{path!r} is a folder", field="--plot")


def _generated_module(net):
    """The network's generated module, or ``(None, why)`` when code generation fails."""
    from ..checking.gradcheck import load_module
    from ..emit.module import generate_module

    try:
        return load_module(generate_module(net)), None
    except SymbpError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - a layer the generator does not support yet
        return None, f"code generation failed: {type(err).__name__}: {err}"


# -- tables -------------------------------------------------------------------------------------
def _text(expr) -> str:
    return "no bound found" if expr is None else sp.sstr(expr)


def _entry_text(entry) -> str:
    """``dy[n', j']/dx[n, j] = f' * delta(n, n')*delta(j, j')``: the deltas last."""
    if entry is None:
        return "not read off the derived VJP"
    lhs, rhs = entry
    printer = FormulaPrinter()
    factors = sp.Mul.make_args(rhs)
    deltas = [f for f in factors if isinstance(f, sp.KroneckerDelta)]
    rest = sp.Mul(*[f for f in factors if not isinstance(f, sp.KroneckerDelta)])
    text = printer.doprint(rest)
    if isinstance(rest, sp.Add | sp.Piecewise) and deltas:
        text = f"({text})"
    value = " ".join(
        ([text] if rest != 1 or not deltas else []) + [printer.doprint(d) for d in deltas]
    )
    of, wrt = lhs.expr, lhs.variables[0]
    return f"d{printer.doprint(of)}/d{printer.doprint(wrt)} = {value}"


def symbolic_table(rows) -> str:
    """Each distinct layer math once (Jacobian, f'(x), how the bound is proved), then per layer
    its bound and the bound on the whole chain."""
    lines = ["Local Jacobians, read off the derived VJPs, and the bounds sympy proves on ||J||_2"]
    seen = set()
    for row in rows:
        key = (row.kind, _entry_text(row.jacobian), row.reason)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"  {row.kind} ({row.structure}), e.g. {row.layer}")
        wrap = dict(width=100, initial_indent="      ", subsequent_indent="          ")
        entry = ("d out / d x over the steps, from the cell's stages" if
                 row.structure == "recurrent" else _entry_text(row.jacobian))
        lines += textwrap.wrap("J: " + entry, **wrap)
        if row.derivative is not None:
            lines += textwrap.wrap(f"f'(x) = {_text(row.derivative)}", **wrap)
        if row.bound_general is not None and row.structure != "sum":
            lines += textwrap.wrap(f"bound: {_text(row.bound_general)}", **wrap)
        lines += textwrap.wrap(f"why: {row.reason}", **wrap)
    lines.append("")
    header = f"{'layer':<22} {'kind':<12} bound on ||J||_2"
    lines += [header, "-" * 60]
    for row in rows:
        name = "  " * row.depth + row.layer
        lines.append(f"{name:<22} {row.kind:<12} {_text(row.bound)}")
    lines.append("")
    lines.append("Bound on ||d out / d input|| of the whole network (product down the chain):")
    lines += textwrap.wrap(
        _text(rows[0].product),
        width=100,
        initial_indent="  ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def numeric_table(measured, *, seed: int) -> str:
    """Gradient norms at initialization with the proved bound; Jacobian singular values."""
    lines = [
        f"At initialization (seed {seed}, batch {measured.batch}, float64): loss "
        f"{measured.loss:.4g}, ||dL/d out|| = {measured.dout:.3g}"
    ]
    columns = (
        f"{'layer':<22} {'|dL/d output|':>13} {'|dL/d input|':>12} {'proved bound':>12} "
        f"{'|dL/d params|':>13}"
    )
    lines += [columns, "-" * len(columns)]
    for row in measured.rows:
        params = math.sqrt(sum(v**2 for v in row.param_grads.values())) if row.param_grads else None
        lines.append(
            f"{row.layer:<22} {_number(row.grad_out):>13} {_number(row.grad_in):>12} "
            f"{_number(row.product * measured.dout):>12} {_number(params):>13}"
        )
    lines.append(
        "proved bound: on |dL/d input|, the product of the bounds down the chain times "
        "|dL/d out|, at these weights and batch statistics."
    )
    lines.append("")
    if not measured.jacobian_batch:
        lines.append("Jacobian singular values skipped: the widths are too large.")
        return "\n".join(lines)
    lines.append(
        f"Jacobians from VJPs with basis vectors (batch {measured.jacobian_batch}): the layer's "
        "own (J) and d out / d input (chain)"
    )
    columns = (
        f"{'layer':<22} {'bound J':>9} {'s_max J':>9} {'s_min J':>9} "
        f"{'bound chain':>11} {'s_max chain':>11} {'s_min chain':>11}"
    )
    lines += [columns, "-" * len(columns)]
    for row in measured.rows:
        jac, chain = row.jacobian, row.chain
        lines.append(
            f"{row.layer:<22} {_number(row.jacobian_bound):>9} {_number(jac[0]):>9} "
            f"{_number(jac[1]):>9} {_number(row.chain_bound):>11} {_number(chain[0]):>11} "
            f"{_number(chain[1]):>11}"
        )
    return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return str(count)  # pragma: no cover


def memory_table(net, model, batches, dtype, *, seed: int, module=None) -> str:
    """What backward keeps, per layer, as a formula; totals predicted (and, given the generated
    ``module``, measured on a random batch) for each batch size."""
    from .memory import measure_cache, minimum_bytes, predicted_bytes, total_elements

    lines = [f"Kept for backward (the generated cache), {dtype}"]
    arrays = {
        id(entry): f"{entry.name}[{', '.join(sp.sstr(d) for d in entry.dims)}]"
        for layer in model
        for entry in layer.entries
    }
    width = max([16, *(len(text) + 1 for text in arrays.values())])
    header = f"{'layer':<20} {'array':<{width}} {'size':<10} {'elements':<12} note"
    lines += [header, "-" * len(header)]
    for layer in model:
        for entry in layer.entries:
            note = f"same array as {entry.shared_with}" if entry.shared_with else ""
            if entry.view:
                note = f"a view of {entry.shared_with}"
            if entry.itemsize:
                note = f"{entry.itemsize} byte{'s' * (entry.itemsize > 1)} an element"
            lines.append(
                f"{layer.layer:<20} {arrays[id(entry)]:<{width}} "
                f"{sp.sstr(sp.Mul(*entry.dims)):<10} {sp.sstr(entry.elements):<12} {note}"
            )
    lines.append(f"total: {sp.sstr(total_elements(model))} elements")
    lines.append("minimum: what the derived backward reads, each array once, in the fewest bits")
    for batch in batches:
        predicted = predicted_bytes(model, batch, dtype)
        lines.append(f"  N = {batch:<6} {_bytes(minimum_bytes(net, batch, dtype)):>12} minimum")
        if module is None:
            lines.append(f"  N = {batch:<6} {_bytes(predicted):>12} predicted")
            continue
        try:
            measured = measure_cache(net, module, batch=batch, dtype=dtype, seed=seed)
        except ValueError as error:  # batch norm does not train on one value per channel
            line = f"  N = {batch:<6} {_bytes(predicted):>12} predicted, not measured: {error}"
            lines.append(line)
            continue
        check = "matches" if predicted == measured else "DIFFERS"
        lines.append(
            f"  N = {batch:<6} {_bytes(predicted):>12} predicted, {_bytes(measured):>12} "
            f"measured ({check})"
        )
    return "\n".join(lines)


# -- figure -------------------------------------------------------------------------------------
def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SymbpError(
            "--plot needs matplotlib: pip install 'symbp[plot]' (or pip install matplotlib)"
        ) from None


def plot_flow(measured, path: str | Path, *, title: str = "") -> None:
    """Gradient norm per layer, log scale: activations, parameters, and the proved bound."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    names = [row.layer for row in measured.rows]
    positions = list(range(len(names)))
    figure = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2), layout="constrained")
    axes = figure.subplots()
    axes.plot(positions, [r.grad_in for r in measured.rows], "o-", label="|dL/d input|")
    with_params = [(p, r) for p, r in zip(positions, measured.rows, strict=True) if r.param_grads]
    axes.plot(
        [p for p, _ in with_params],
        [math.sqrt(sum(v**2 for v in r.param_grads.values())) for _, r in with_params],
        "s--",
        label="|dL/d parameters|",
    )
    bounds = [
        (p, r.product * measured.dout)
        for p, r in zip(positions, measured.rows, strict=True)
        if math.isfinite(r.product)
    ]
    if bounds:
        axes.plot(
            [p for p, _ in bounds],
            [b for _, b in bounds],
            "x:",  # a marker too: a bound on one layer alone is a point, not a line
            color="gray",
            label="proved bound on |dL/d input|",
        )
    axes.set_yscale("log")
    axes.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("Frobenius norm")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="major", alpha=0.3)
    try:
        figure.savefig(path, dpi=110)
    except OSError as err:  # a folder of that name, a read-only place
        raise SpecError(f"cannot write {path}: {err.strerror or err}", field="--plot") from None
