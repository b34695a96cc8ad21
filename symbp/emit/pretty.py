"""Terminal output of ``symbp derive``: each layer's forward and derived backward formulas.

Index-notation formulas go through sympy's pretty printer; each is followed by its whole-array
form as NumPy prints it, and by what backward keeps from the forward pass.

The report is a sequence of blocks: a :class:`Text` line or a :class:`Picture` (a formula
sympy drew in two dimensions). :func:`render` wraps a block to a terminal width: a text line
breaks at single spaces, preferring the outermost bracket level, and a picture is cut between
terms (before a ``+`` or ``-`` on its baseline), else between factors (before a ``⋅``), else
at an empty column, never through a glyph; continuation lines are indented four more spaces.
Joining the pieces gives back the unwrapped block (:func:`join`). The one exception to the
width is a token with no space in it that is longer than the line (a text line is never cut
inside a word). A formula whose picture cannot be cut narrow enough is shown in sympy's
one-line form instead, wrapped as text.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sympy as sp
from sympy.printing.pretty.pretty import PrettyPrinter
from sympy.printing.pretty.pretty_symbology import pretty_use_unicode
from sympy.printing.pretty.stringpict import prettyForm

from ..declare.layers import Elementwise, Layer
from ..declare.net import Net
from ..derivation.adjoint import adjoint_lines
from ..derivation.arrays import Lowering
from ..derivation.layer import LayerDerivation, derive_layer
from ..derivation.network import DerivedLayer, derive_network
from ..derivation.plan import Sum, build_plan
from ..derivation.readings import computed_form, gather_form, reading
from ..derivation.unrolled import UnrolledDerivation, recurrence
from ..derivation.verify import default_sizes, proof_batches, verify_layer
from .numpy_printer import numpy_code
from .simplest import simplest_form

INDENT = "    "
#: Continuation lines are indented this much more than the line they continue.
CONTINUATION = "    "


@dataclass(frozen=True)
class Text:
    """One logical line of text (a heading, a whole-array formula, a verdict)."""

    text: str


@dataclass(frozen=True)
class Picture:
    """A formula drawn by sympy in two dimensions: its rows (indented) and baseline row;
    ``linear`` is the same formula on one line, for when the picture cannot be cut to fit."""

    rows: tuple[str, ...]
    baseline: int
    linear: str


Block = Text | Picture


@dataclass(frozen=True)
class Piece:
    """A piece of a wrapped block: its lines, and for a picture the row it starts at."""

    lines: tuple[str, ...]
    top: int = 0
    columns: int = 0  # a picture's piece: how many of its columns, trailing blanks too
    linear: bool = False  # a line of the one-line form of a picture too wide to cut


def _cells(row: str) -> list[str]:
    """A row as terminal cells: each character with the combining marks that follow it."""
    cells: list[str] = []
    for char in row:
        if cells and unicodedata.combining(char):
            cells[-1] += char
        else:
            cells.append(char)
    return cells


def display_width(line: str) -> int:
    return len(_cells(line))


class _Printer(PrettyPrinter):
    """sympy's pretty printer with Kronecker deltas on one line, ``δ(u, k + p')``, as
    functions are (sympy raises the δ over a subscript on the formula's baseline, where a
    ``+`` in the subscript would look like one between terms)."""

    def _print_KroneckerDelta(self, e):
        name = "δ" if self._use_unicode else "delta"
        pform = self._print_seq(e.args, "(", ")")
        return prettyForm(*pform.left(name), binding=prettyForm.FUNC)


def _pretty(lhs: sp.Expr, rhs: sp.Expr, unicode: bool) -> Picture:
    equation = sp.Eq(lhs, rhs, evaluate=False)
    flag = pretty_use_unicode(unicode)
    try:
        drawn = _Printer({"use_unicode": unicode, "wrap_line": False})._print(equation)
    finally:
        pretty_use_unicode(flag)
    rows = tuple(INDENT + row for row in drawn.picture)
    return Picture(rows, drawn.baseline, f"{INDENT}{sp.sstr(lhs)} = {sp.sstr(rhs)}")


def render(block: Block, width: int | None) -> list[str]:
    """The lines of a block wrapped to ``width`` columns (``None``: not wrapped)."""
    return [line for piece in wrap(block, width) for line in piece.lines]


def wrap(block: Block, width: int | None) -> list[Piece]:
    if isinstance(block, Text):
        return [Piece((line,)) for line in _wrap_text(block.text, width)]
    rows = [row.rstrip() for row in block.rows]
    if width is None or max(map(display_width, rows)) <= width:
        return [Piece(tuple(rows))]
    if len(rows) == 1:  # a formula on one line wraps as a line of text does
        return [Piece((line,), linear=True) for line in _wrap_text(rows[0], width)]
    pieces = _cut_picture(block, width)
    if pieces is None:
        return [Piece((line,), linear=True) for line in _wrap_text(block.linear, width)]
    return pieces


def join(pieces: list[Piece], block: Block) -> list[str]:
    """The inverse of :func:`wrap`: the unwrapped lines of ``block`` from its pieces."""
    if isinstance(block, Text) or pieces[0].linear:  # (a picture's rows or its one-line form)
        text = pieces[0].lines[0]
        for piece in pieces[1:]:
            rest = piece.lines[0].lstrip(" ")
            text += rest if text[-1] in "([{" else " " + rest
        return [text]
    rows = [""] * len(block.rows)
    for number, piece in enumerate(pieces):
        cells = [_cells(line) for line in piece.lines]
        if number:
            cells = [c[len(INDENT + CONTINUATION):] for c in cells]
        piece_width = piece.columns or max(len(c) for c in cells)
        for row in range(len(rows)):
            inside = piece.top <= row < piece.top + len(cells)
            content = cells[row - piece.top] if inside else []
            rows[row] += "".join(content + [" "] * (piece_width - len(content)))
    return [row.rstrip() for row in rows]


def _wrap_text(text: str, width: int | None) -> list[str]:
    """A line broken to fit ``width``, at a single space (dropped) or just after an opening
    bracket with no space after it (``f(`` then the arguments): the break at the outermost
    bracket level among those in the last half of the room, else the last that fits;
    continuation lines indented. A word longer than the room, with no such bracket in it, stays
    whole (the one way a line can overflow)."""
    if width is None or display_width(text) <= width:
        return [text]
    indent = len(text) - len(text.lstrip(" "))
    prefix = " " * indent + CONTINUATION
    lines, body, first = [], text, True
    while True:
        lead = "" if first else prefix
        room = width - display_width(lead)
        if display_width(body) <= room:
            lines.append(lead + body)
            return lines
        breaks = _text_breaks(body, indent if first else 0)
        fitting = [(position, depth) for position, depth in breaks if position <= room]
        if fitting:
            late = [b for b in fitting if b[0] >= room // 2] or fitting
            least = min(depth for _, depth in late)
            position = max(p for p, depth in late if depth == least)
        elif breaks:
            position = breaks[0][0]
        else:
            lines.append(lead + body)
            return lines
        lines.append(lead + body[:position])
        body = body[position + 1:] if body[position] == " " else body[position:]
        first = False


def _text_breaks(text: str, start: int) -> list[tuple[int, int]]:
    """Where a line may break, with the bracket depth there: single spaces (a space between
    two non-spaces) and the position after an opening bracket that a non-space follows."""
    found, depth = [], 0
    for position, char in enumerate(text):
        if position > start and text[position - 1] in "([{" and char not in " )]}":
            found.append((position, depth))
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif (
            char == " "
            and position > start
            and position + 1 < len(text)
            and text[position - 1] not in " ([{"
            and text[position + 1] != " "
        ):
            found.append((position, depth))
    return found


def _cut_picture(block: Picture, width: int) -> list[Piece] | None:
    grid = [_cells(row.rstrip()) for row in block.rows]
    total = max(map(len, grid))
    grid = [row + [" "] * (total - len(row)) for row in grid]
    baseline = grid[block.baseline]
    others = [row for number, row in enumerate(grid) if number != block.baseline]

    def clear(column: int) -> bool:  # nothing above or below the baseline in this column
        return all(row[column] == " " for row in others)

    # Candidate cuts (a piece starts at the column), best kind first: before a sign between
    # terms, before a product's dot, after an empty column, all outside one-row brackets
    # (``x[n, c]``, ``f(a, b)``); then after an empty column or an opening bracket inside them.
    kinds: list[list[int]] = [[], [], [], []]
    depths: dict[int, int] = {}
    depth = 0
    start = len(_cells(INDENT))
    for column in range(total):
        char = baseline[column]
        if column > start and clear(column) and clear(column - 1):
            previous = baseline[column - 1]
            spaced = previous == " " and char != " "
            after = column + 1 < total and baseline[column + 1] == " "
            if depth == 0 and char in "+-" and spaced and after:
                kinds[0].append(column)
            elif depth == 0 and char in "⋅*":
                kinds[1].append(column)
            elif depth == 0 and spaced:
                kinds[2].append(column)
            elif spaced or (previous in "([{" and char not in " )]}"):
                kinds[3].append(column)
                depths[column] = depth
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
    prefix = len(INDENT + CONTINUATION)
    pieces, left = [], 0
    while True:
        lead = 0 if not pieces else prefix
        if lead + _used(grid, left, total) <= width:
            pieces.append(_piece(grid, left, total, bool(pieces)))
            return pieces
        cut = None
        for kind, candidates in enumerate(kinds):
            fits = [c for c in candidates if left < c and lead + _used(grid, left, c) <= width]
            if fits and kind == 3:  # inside brackets: the outermost level, late in the room
                late = [c for c in fits if lead + c - left >= width // 2] or fits
                least = min(depths[c] for c in late)
                cut = max(c for c in late if depths[c] == least)
                break
            if fits:
                cut = max(fits)
                break
        if cut is None:
            return None
        pieces.append(_piece(grid, left, cut, bool(pieces)))
        left = cut


def _used(grid: list[list[str]], left: int, right: int) -> int:
    """The width of columns ``left:right`` without trailing blanks."""
    used = 0
    for row in grid:
        content = "".join(row[left:right]).rstrip()
        used = max(used, len(_cells(content)))
    return used


def _piece(grid: list[list[str]], left: int, right: int, continued: bool) -> Piece:
    rows = ["".join(row[left:right]).rstrip() for row in grid]
    top = next(number for number, row in enumerate(rows) if row)
    bottom = max(number for number, row in enumerate(rows) if row)
    prefix = INDENT + CONTINUATION if continued else ""
    lines = tuple(prefix + row if row else "" for row in rows[top:bottom + 1])
    return Piece(lines, top, right - left)


def _array_line(derivation: LayerDerivation, name: str, expr: sp.Expr, indices) -> Text:
    names = set(derivation.form.arrays) | {derivation.upstream.name}
    try:
        code = numpy_code(Lowering(names, derivation.form).lower(expr, indices))
    except Exception as err:  # noqa: BLE001 - a lowering gap is shown, not fatal here
        code = f"(no whole-array form: {err})"
    return Text(f"{INDENT}{name} = {code}")


def layer_report(derivation: LayerDerivation, unicode: bool = True) -> list[Block]:
    if derivation.cell is not None:  # unrolled over time: its cell's derivation, once
        return unrolled_report(derivation, unicode)
    form = derivation.form
    lines: list[Block] = [Text("  forward:")]
    for stage in form.stages:
        lines.append(_pretty(stage.array[stage.indices], stage.expr, unicode))
        lines.append(_array_line(derivation, stage.name, stage.expr, stage.indices))
    intermediates = [a for a in derivation.staged if a.array.name not in derivation.vjp]
    if intermediates:
        lines.append(Text("  backward, staged chain rule (each intermediate gradient computed "
                          "once):"))
        for adjoint in derivation.staged:
            lines.append(_pretty(adjoint.lhs, adjoint.expr, unicode))
    upstream = derivation.upstream.name
    given = f"given {upstream}" if form.output.array.dims else "the loss is the output"
    lines.append(Text(f"  backward ({given}):"))
    for adjoint in derivation.vjp.values():
        shown = simplest_form(adjoint.expr) if form.elementwise else adjoint.expr
        lines.append(_pretty(adjoint.lhs, shown, unicode))
        said = reading(adjoint.expr, upstream)
        if said:
            gathered = gather_form(adjoint.expr, upstream)
            if gathered != adjoint.expr:
                lines.append(Text(f"{INDENT}that is, with the deltas solved:"))
                lines.append(_pretty(adjoint.lhs, gathered, unicode))
            lines.append(Text(f"{INDENT}({said})"))
        computed = computed_form(adjoint.expr, upstream, form.gather)
        if shown is not adjoint.expr and computed == adjoint.expr:
            computed = shown
        lines.append(_array_line(derivation, adjoint.name, computed, adjoint.indices))
    if derivation.identities:
        lines.append(Text("  identities the engine proved from the forward definitions:"))
        for rule in derivation.identities:
            lines.append(_pretty(rule.lhs, rule.rhs, unicode))
    stored = ", ".join(derivation.stored) or "nothing"
    lines.append(Text(f"  backward reads from the forward pass: {stored}"))
    for carried in derivation.carried:
        replaced = [n for n in derivation.stored if derivation.code_reads is not None
                    and n not in derivation.code_reads and n not in derivation.param_names]
        kept = f"  the generated code keeps {carried.name} too (computed once for both passes):"
        if replaced and carried.dtype == "index":  # max pooling: the arg-max, not the input
            kept = (f"  the generated code keeps {carried.name} in place of "
                    f"{', '.join(replaced)} (what its backward reads of it):")
        lines.append(Text(kept))
        lines.append(_pretty(carried.array[carried.indices], carried.math, unicode))
    return lines


BPTT = ("backpropagation through time: this backward is applied for t = T-1..0, each state's "
        "gradient handed to step t-1, the weights' gradients summed over t")


def unrolled_report(derivation: UnrolledDerivation, unicode: bool = True) -> list[Block]:
    """A layer unrolled over time: each part of its cell derived once, then BPTT as the
    recurrence over t that it is."""
    cell, parts = derivation.cell, derivation.parts
    lines: list[Block] = [Text(f"  unrolled over t = 0..T-1 with shared weights; one step, "
                               f"{cell.describe()}:")]
    for layer, part in zip(cell.parts, parts, strict=True):
        if len(parts) > 1:
            lines.append(Text(f"  -- {layer.describe()}, computing "
                              f"{part.form.output.name}:"))
        lines += layer_report(part, unicode)
    stacked: dict[str, list[str]] = {}
    for param in derivation.form.params:
        blocks = sorted((block, name) for name, (of, block, _) in cell.blocks.items()
                        if of == param.name)
        if blocks:
            stacked[param.name] = [name for _, name in blocks]
    for param, names in stacked.items():
        lines.append(Text(f"  {', '.join(names)}: the blocks of rows of {param}, in order"))
    read = [f"{state} = {state}[t-1], {state}_new = {state}[t]" for state in cell.states]
    output = cell.states[0]
    lines.append(Text(f"  {BPTT}; read at step t ({derivation.step_input} = "
                      f"{derivation.step_input}[t], {', '.join(read)}; d{output}[t] is the "
                      f"whole gradient of {output}[t]: dout at the last step, or with "
                      f"sequence = true dout[t] plus what step t+1 hands back):"))
    lines += [_pretty(lhs, rhs, unicode) for lhs, rhs in recurrence(derivation)]
    return lines

class Progress:
    """Progress of a long proof, on stderr: nothing for a proof that ends within
    :attr:`after` seconds; then one line every :attr:`every` seconds (overwritten in place on
    a terminal) saying which layer, gradient and element it is at."""

    after = 3.0
    every = 5.0

    def __init__(self, stream=None):
        self.stream = stream
        self.started = self.shown = 0.0
        self.dirty = False

    def start(self) -> None:
        self.started = time.monotonic()
        self.shown = 0.0

    def tick(self, text: str) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self.started < self.after or now - self.shown < self.every:
            return
        self.shown = now
        tty = getattr(self.stream, "isatty", lambda: False)()
        elapsed = f"{now - self.started:.0f} s"
        line = f"symbp: proving {text} ({elapsed})"
        if tty:
            self.stream.write("\r\033[K" + line)
            self.dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.dirty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.dirty = False


def verification_lines(
    derivation: LayerDerivation, label: str = "", progress: Progress | None = None,
    part: str = "",
) -> Iterator[tuple[Text, bool]]:
    """Each proof's verdict line as soon as it is proved, with whether it succeeded
    (``part``: which part of a cell, named in each line)."""
    if derivation.cell is not None:  # unrolled over time: each part of its cell, proved
        for derived in derivation.parts:
            name = f"{derived.form.output.name} part" if len(derivation.parts) > 1 else ""
            yield from verification_lines(derived, label, progress, part=name)
        return
    progress = progress or Progress()
    for batch in proof_batches(derivation.form):
        sizes = default_sizes(derivation.form, batch=batch)
        for staged in (False, True) if len(derivation.staged) > len(derivation.vjp) else (False,):
            what = "staged" if staged else "compact"
            sizes_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
            progress.start()

            def tick(name, done, total, what=what, sizes_text=sizes_text):
                progress.tick(
                    f"{label + ' ' if label else ''}{part + ' ' if part else ''}{name} "
                    f"({what}, {sizes_text}): "
                    f"element {done + 1} of {total}"
                )

            verdicts = verify_layer(derivation, sizes, staged=staged, progress=tick)
            progress.clear()
            for verdict in verdicts:
                status = "proven equal to direct differentiation" if verdict.proven else "FAILED"
                detail = f" {verdict.detail}" if verdict.detail else ""
                line = (f"  verify {part + ' ' if part else ''}{verdict.name} ({what}, "
                        f"{sizes_text}): {status}{detail}")
                yield Text(line), verdict.proven


def _heading(item: DerivedLayer) -> Text:
    layer: Layer = item.layer
    shapes = f"{list(item.placed.in_shape)} -> {list(item.placed.out_shape)}"
    params = item.placed.param_shapes
    text = f"== {item.name}: {layer.describe()}  per sample {shapes}"
    if params:
        text += "; params " + ", ".join(f"{k} {list(v)}" for k, v in params.items())
    return Text(text)


class Report:
    """The blocks of ``symbp derive``, produced as they are ready (a proof's verdict as soon
    as it is proved); :attr:`ok` is False once a requested proof failed."""

    def __init__(self, blocks: Callable[[Report], Iterator[Block]]):
        self._blocks = blocks
        self.ok = True

    def blocks(self) -> Iterator[Block]:
        yield from self._blocks(self)

    def lines(self, width: int | None = None) -> Iterator[str]:
        for block in self.blocks():
            yield from render(block, width)

    def text(self, width: int | None = None) -> str:
        return "\n".join(self.lines(width))


def _proofs(report: Report, derivation, label, progress) -> Iterator[Block]:
    for line, proven in verification_lines(derivation, label, progress):
        report.ok &= proven
        yield line


def derivation_blocks(
    net: Net,
    *,
    layer: str | None = None,
    verify: bool = False,
    unicode: bool = True,
    progress: Progress | None = None,
) -> Report:
    """The report of ``symbp derive`` for a network (or one of its layers)."""
    derivation = derive_network(net)
    items = derivation.layers
    if layer is not None:
        net.find(layer)  # raises a SpecError naming the missing layer
        items = [i for i in items if i.name == layer]

    def blocks(report: Report) -> Iterator[Block]:
        if layer is None:
            def described(name, shape):  # integer ids: their range
                ids = f"ids in [0, {net.ids[name]}), " if name in net.ids else ""
                return f"{ids}{list(shape)}"

            if list(net.inputs) == ["x"]:
                shape = f"input {described('x', net.input_shape)}"
            else:
                shape = "inputs " + ", ".join(
                    f"{name} {described(name, s)}" for name, s in net.inputs.items())
            yield Text(
                f"network {net.name}: {shape} per sample, loss {net.loss and net.loss.kind}"
            )
        verified = set()
        for item in items:
            yield _heading(item)
            if item.placed.body:  # a block: its formulas read the body's output as ``f``
                body = ", ".join(b.name for b in item.placed.body)
                body_input = item.derivation.form.inputs[1].name
                yield Text(f"  {body_input}: the output of its body, {body}")
            yield from layer_report(item.derivation, unicode)
            if verify and id(item.derivation) not in verified:
                verified.add(id(item.derivation))
                yield from _proofs(report, item.derivation, item.name, progress)
                for line, proven in adjoint_lines(item.layer, item.placed.in_shape):
                    report.ok &= proven
                    yield Text(line)
        if layer is None and derivation.loss is not None:
            yield Text(f"== loss: {net.loss.kind}")
            yield from layer_report(derivation.loss, unicode)
            if verify:
                yield from _proofs(report, derivation.loss, "loss", progress)
        if layer is None and derivation.decay:
            from .pretty_objective import objective_blocks  # it builds on this module

            yield from objective_blocks(derivation, unicode, report, verify, progress)
        if layer is None:
            yield Text("== backward order (each upstream gradient computed once and reused):")
            plan = build_plan(net, derivation)
            if plan.graph:
                yield Text("  (the graph in reverse topological order: a value read by several "
                           "layers gets the sum of what each hands back, once all have)")
            for entry in plan.backward:
                if isinstance(entry, Sum):
                    yield Text(f"  sum: {entry.target} = {' + '.join(entry.parts)}")
                else:
                    yield Text(f"  {entry.name}: from {entry.upstream} -> "
                               f"{', '.join(entry.produces) or '(none: integer ids)'}")

    return Report(blocks)


def expression_blocks(
    layer: Elementwise, *, verify: bool = False, unicode: bool = True,
    progress: Progress | None = None,
) -> Report:
    derivation = derive_layer(layer.forward_form((1,)))

    def blocks(report: Report) -> Iterator[Block]:
        yield Text(f"== activation {layer.text}")
        yield from layer_report(derivation, unicode)
        if verify:
            yield from _proofs(report, derivation, "", progress)

    return Report(blocks)


def derivation_report(
    net: Net, *, layer: str | None = None, verify: bool = False, unicode: bool = True,
    width: int | None = None,
) -> tuple[str, bool]:
    """The text of ``symbp derive`` and whether every requested proof succeeded."""
    report = derivation_blocks(net, layer=layer, verify=verify, unicode=unicode)
    text = report.text(width)
    return text, report.ok


def expression_report(
    layer: Elementwise, *, verify: bool = False, unicode: bool = True, width: int | None = None
) -> tuple[str, bool]:
    report = expression_blocks(layer, verify=verify, unicode=unicode)
    text = report.text(width)
    return text, report.ok
