"""Study notes for a network's backpropagation, as LaTeX or Markdown (``$$`` math).

:func:`render_notes` turns a :class:`~symbp.derivation.network.NetworkDerivation` into a document:
the network as a table, the forward pass (``h^{(l)} = f_l(h^{(l-1)})``), every layer's forward
definition and derived vector-Jacobian products (index form and whole-array form; for multi-stage
layers such as batch norm the staged chain rule *and* the compact form, with the scalar-expansion
proof that they agree), the loss, the chain-rule product of Jacobians for every parameter, the
delta recursion that backprop computes, and the activation derivatives with their largest values.

Every formula is one of the engine's sympy expressions (or built from them with the printing
nodes of :mod:`.latex_printer`) printed by :class:`~.latex_printer.NotesLatexPrinter`; the
templates under ``templates/`` (package ``symbp.templates``) hold the document's structure only.
:func:`gallery` renders all ``examples/*.toml`` into one Markdown page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import sympy as sp

from ..declare.net import Placed
from ..derivation.adjoint import prove_adjoint
from ..derivation.arrays import (
    Lowering,
)
from ..derivation.layer import LayerDerivation
from ..derivation.network import DerivedLayer, NetworkDerivation
from ..derivation.plan import build_plan
from ..derivation.verify import default_sizes, verify_layer
from ..errors import DerivationError, SpecError
from . import template_folder
from .latex_printer import (
    ROW_SEPARATOR,
    Apply,
    AtLayer,
    Compose,
    Delta,
    Element,
    Grad,
    InSpace,
    NotesLatexPrinter,
    Shape,
)
from .notes_backprop import BackpropSections
from .notes_math import _full_convolution, _readable, _text
from .notes_objective import objective_section
from .notes_recurrent import RecurrentSections, merged_math

FORMATS = ("tex", "md")
NOTATIONS = ("d2l", "cs231n")
#: ``"all"``: every layer numbered; ``"params"``: only the layers with parameters (see _number)
NUMBERINGS = ("all", "params")
#: Batch sizes at which the notes' equality claims are proven by scalar expansion.
VERIFY_BATCHES = (2,)

H = sp.Symbol("h")


@dataclass(repr=False)
class Notes:
    """The notes in both formats; Jupyter shows them rendered.

    A notebook displays them through :meth:`_repr_markdown_`: Markdown with ``$...$`` and
    ``$$...$$`` math, which every frontend renders (MathJax, KaTeX). There is deliberately no
    ``_repr_latex_``: the LaTeX is a document (sections, tables, ``align*``), and a notebook's
    ``text/latex`` renderer is MathJax, which shows only math; a frontend that preferred it
    would print the document's commands as text.
    """

    tex: str
    markdown: str
    #: what ``str()`` gives: ``"md"`` (the Markdown) or ``"tex"`` (the LaTeX)
    fmt: str = "md"

    def _repr_markdown_(self) -> str:
        return self.markdown

    def __repr__(self) -> str:  # the text/plain fallback: not the whole document twice
        first = self.markdown.lstrip().splitlines()[0] if self.markdown.strip() else ""
        return f"<symbp Notes: {first.lstrip('# ')!r}, {len(self.markdown)} characters of Markdown>"

    def __str__(self) -> str:
        return self.tex if self.fmt == "tex" else self.markdown


def make_notes(
    derivation: NetworkDerivation,
    *,
    steps: bool = False,
    notation: str = "d2l",
    fragment: bool = False,
    flow: list | None = None,
    fmt: str = "md",
    numbering: str = "all",
) -> Notes:
    """Both formats at once (what ``symbp.notes`` returns); ``str()`` gives ``fmt``."""
    options = {
        "steps": steps,
        "notation": notation,
        "fragment": fragment,
        "flow": flow,
        "numbering": numbering,
    }
    return Notes(
        tex=render_notes(derivation, fmt="tex", **options),
        markdown=render_notes(derivation, fmt="md", **options),
        fmt=fmt,
    )


def render_notes(
    derivation: NetworkDerivation,
    *,
    fmt: str = "tex",
    steps: bool = False,
    notation: str = "d2l",
    fragment: bool = False,
    flow: list | None = None,
    numbering: str = "all",
    graph: str | None = None,
) -> str:
    """The notes for one network as a LaTeX document (``fmt="tex"``) or Markdown (``"md"``).

    ``steps`` adds what the engine did for each formula; ``notation`` is ``"d2l"``
    (:math:`\\partial J/\\partial W`) or ``"cs231n"`` (``dW``); ``fragment`` leaves out the
    document preamble (LaTeX) or the title (Markdown), for pasting into an existing document.
    ``flow`` adds a section "Gradient flow" from the rows of ``symbp.flow.flow_bounds`` (any
    objects with the attributes ``layer``, ``kind``, ``jacobian``, ``derivative``, ``bound``,
    ``product`` and ``reason``; this module does not import :mod:`symbp.flow`, which imports it).
    ``numbering`` is ``"all"`` (every layer: ``1..L``, ``l.k`` inside residual block ``l``) or
    ``"params"`` (only the layers with parameters ``1, 2, ...``, as textbooks number weight
    layers; a layer without parameters is ``1'``, ``1''``, ...). ``graph`` (LaTeX only): a TikZ
    picture of the computational graph (:func:`symbp.emit.drawing.render_tikz`), as a figure.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if notation not in NOTATIONS:
        raise ValueError(f"notation must be one of {NOTATIONS}, got {notation!r}")
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, got {numbering!r}")
    builder = _Builder(derivation, fmt=fmt, steps=steps, notation=notation, numbering=numbering)
    context = builder.context()
    context["fragment"] = fragment
    context["graph"] = graph
    context["flow"] = _Builder.flow_section(builder, flow) if flow is not None else None
    return _environment().get_template(f"notes.{fmt}.j2").render(**context)


def gallery(examples_dir: str | Path) -> str:
    """A Markdown page with the notes of every ``examples/*.toml``, generated by symbp."""
    from ..declare.spec import load_spec
    from ..derivation.network import derive_network

    examples = []
    for path in sorted(Path(examples_dir).glob("*.toml")):
        net = load_spec(path)
        try:
            body = render_notes(derive_network(net), fmt="md", fragment=True)
        except SpecError as err:  # a layer the notes cannot print yet (rnn): said, not left out
            body = f"*No notes for this network yet: {err}.*\n"
        examples.append({"file": path.name, "name": net.name, "body": body})
    return _environment().get_template("gallery.md.j2").render(examples=examples)


def _environment() -> jinja2.Environment:
    # LaTeX is full of braces, so the template tags are << >>, <% %> and <# #>.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_folder()),
        undefined=jinja2.StrictUndefined,
        block_start_string="<%",
        block_end_string="%>",
        variable_start_string="<<",
        variable_end_string=">>",
        comment_start_string="<#",
        comment_end_string="#>",
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


# -- building the context -----------------------------------------------------------------------
def _number(items: list[Placed], numbering: str):
    """Each layer's label and its input's label (``0`` is the network input).

    ``"all"``: ``1..L`` for the top level, ``l.k`` inside residual ``l``. ``"params"``: the layers
    with parameters ``1, 2, ...`` in the order they compute (residual bodies included), as
    textbooks number weight layers (d2l's second linear layer has ``W^{(2)}``); a layer
    without parameters takes the label of the layer computed before it with a prime
    (``1'``, ``1''``; ``0'`` before the first layer with parameters).
    """
    labels: dict[str, str] = {}
    inputs: dict[str, str] = {}
    if numbering == "all":

        def visit(items, prefix, before):
            for k, item in enumerate(items, start=1):
                label = f"{prefix}{k}"
                labels[item.name] = label
                inputs[item.name] = before
                if item.body:
                    visit(item.body, f"{label}.", before)
                before = label

        visit(items, "", "0")
        return labels, inputs
    counter = 0
    last = "0"

    def visit_params(items, before):
        nonlocal counter, last
        for item in items:
            inputs[item.name] = before
            if item.body:
                visit_params(item.body, before)
            if item.layer.param_shapes(item.in_shape):
                counter += 1
                last = str(counter)
            else:
                last = f"{last}'"
            labels[item.name] = last
            before = last

    visit_params(items, "0")
    return labels, inputs


#: proofs done, by (derivation, staged, batch): (the derivation, whether every claim held)
_VERIFIED: dict[tuple[int, bool, int], tuple[LayerDerivation, bool]] = {}


def proof_sizes(derivation: LayerDerivation, batch: int) -> dict[sp.Symbol, int]:
    """The sizes of the notes' proof: the verifier's defaults, with

    * a layer that reads no windows (batch norm on images) proven on 1 x 1 images: its
      per-channel reductions then run over the batch as in the 2-D case;
    * a zero-padded layer (padding ``P``) proven on an image ``2P`` smaller than the default,
      so that its *padded* input has the default's size: every output still reads the padding
      on both sides and the input in between, and the scalar expansion (whose cost grows with
      the square of the number of elements) stays as small as an unpadded layer's. At the
      default sizes a padded convolution took 12 s to prove, the rest of the notes 1-5 s.
    """
    form = derivation.form
    sizes = default_sizes(form, batch=batch)
    if not form.window_dims:
        for symbol in sizes:
            if _spatial(symbol):
                sizes[symbol] = 1
        return sizes
    padding = next((v for s, v in sizes.items() if s.name == "padding"), 0)
    if padding:
        smallest = max(sizes[s] for s in form.window_dims)  # the kernel fits the padded input
        for symbol in sizes:
            if symbol.name in ("H_in", "W_in"):
                sizes[symbol] = max(sizes[symbol] - 2 * padding, smallest - 2 * padding, 1)
        for symbol, rule in form.size_rules.items():
            sizes[symbol] = int(rule.xreplace(sizes))
    return sizes


def _spatial(symbol: sp.Symbol) -> bool:
    """An image height or width (``H``, ``W_in``, ``H_out``)."""
    return symbol.name.split("_")[0] in ("H", "W")


def _proven(derivation: LayerDerivation, *, staged: bool) -> bool:
    """Both forms equal direct differentiation at the batch sizes of :data:`VERIFY_BATCHES`."""
    for batch in VERIFY_BATCHES:
        key = (id(derivation), staged, batch)
        if key not in _VERIFIED or _VERIFIED[key][0] is not derivation:
            sizes = proof_sizes(derivation, batch)
            verdicts = verify_layer(derivation, sizes, staged=staged)
            _VERIFIED[key] = (derivation, all(v.proven for v in verdicts))
        if not _VERIFIED[key][1]:
            return False
    return True


class _Builder(BackpropSections, RecurrentSections):
    def __init__(
        self,
        derivation: NetworkDerivation,
        *,
        fmt: str,
        steps: bool,
        notation: str,
        numbering: str = "all",
    ):
        self.derivation = derivation
        self.net = derivation.net
        self.fmt = fmt
        self.steps = steps
        self.notation = notation
        self.settings = {
            "notation": notation,
            "indicator": r"\mathbb{I}" if fmt == "tex" else r"\mathbb{1}",
            # with weight decay d2l's J is the objective L + s (.notes_objective)
            "loss_symbol": "J" if notation == "d2l" and not derivation.decay else "L",
        }
        self.numbering = numbering
        self.plan = build_plan(self.net, derivation)
        self.labels, self.inputs = _number(self.net.placed, numbering)
        # a graph: the network's inputs (the first is 0, the others by name) and what each
        # layer reads first (a chain: the layer before it)
        for k, name in enumerate(self.net.inputs):
            self.labels[name] = "0" if k == 0 else name
        for item in self.net.walk():
            self.inputs[item.name] = self.labels[item.inputs[0]]
        #: the label of the network's output (the last top-level layer)
        self.depth = self.labels[self.net.placed[-1].name]
        #: residual block -> the label of its input where the body starts (``l.0``)
        self.block_input = {
            item.name: f"{self.labels[item.name]}.0" for item in self.net.walk() if item.body
        }

    # printers
    def index_printer(self, derivation: LayerDerivation) -> NotesLatexPrinter:
        return NotesLatexPrinter({**self.settings, "arrays": set(derivation.form.arrays)})

    def network_index_printer(self) -> NotesLatexPrinter:
        """Index form in network names (:class:`Element`), for layers without a matrix form."""
        return NotesLatexPrinter({**self.settings, "arrays": set()})

    def whole_printer(self, arrays=()) -> NotesLatexPrinter:
        known = set(arrays) | {"x", "o"}
        if self.derivation.loss is not None:
            known |= {a.name for a in self.derivation.loss.form.aux}
        return NotesLatexPrinter({**self.settings, "arrays": known, "whole": True})

    def context(self) -> dict[str, Any]:
        whole = self.whole_printer()
        return {
            "title": _text(self.net.name, self.fmt),
            "notation": self.notation,
            "loss_symbol": self.settings["loss_symbol"],
            "input": whole.doprint(AtLayer(H, sp.Symbol("0"))),
            "output": whole.doprint(AtLayer(H, sp.Symbol(self.depth))),
            "delta_definition": whole.equation(
                Delta(sp.Symbol("l")), Grad(AtLayer(H, sp.Symbol("l")))
            ),
            "table": self._table(),
            "forward": self._forward(),
            "layers": self._layers(),
            "loss": self._loss(),
            "objective": objective_section(self),
            "chains": self._chains(),
            "residual_jacobians": self._residual_jacobians(),
            "deltas": self._deltas(),
            "activations": self._activations(),
            "steps": self.steps,
            "numbering": self.numbering,
            "block_input": self._block_input_names(),
            "fan_out": self.fan_out(),
            "recurrent": self.recurrent_context(),
        }

    def _block_input_names(self) -> dict[str, str] | None:
        """How the notes write a residual block's input as the body sees it (``l.0``)."""
        if not self.block_input:
            return None
        whole = self.whole_printer()
        return {
            "delta": whole.doprint(Delta(sp.Symbol("l.0"))),
            "skip": whole.doprint(Delta(sp.Symbol("l"))),
        }

    # -- the network table ----------------------------------------------------------------------
    def _table(self) -> list[dict[str, Any]]:
        whole = self.whole_printer()
        rows = []
        N = sp.Symbol("N")
        for item in self.net.walk():
            label = sp.Symbol(self.labels[item.name])
            params = []
            for key, shape in item.layer.param_shapes(item.in_shape).items():
                params.append(whole.doprint(InSpace(AtLayer(sp.Symbol(key), label), Shape(*shape))))
            rows.append(
                {
                    "label": self.labels[item.name],
                    "name": _text(item.name, self.fmt),
                    "type": _text(item.layer.kind, self.fmt),
                    "input": whole.doprint(Shape(N, *item.in_shape)),
                    "output": whole.doprint(Shape(N, *item.out_shape)),
                    "params": params,
                }
            )
        return rows

    # -- substitution of a layer's local names by network-level ones ----------------------------
    def _network_names(self, derived: DerivedLayer) -> dict[sp.Symbol, sp.Expr]:
        item, form = derived.placed, derived.derivation.form
        label = sp.Symbol(self.labels[item.name])
        before = sp.Symbol(self.inputs[item.name])
        mapping: dict[str, sp.Expr] = {}
        for name in form.arrays:
            mapping[name] = AtLayer(sp.Symbol(name), label)
        mapping[form.inputs[0].name] = AtLayer(H, before)
        step = self.plan.step(item.name)
        for array, value in zip(form.inputs[1:], step.inputs[1:], strict=True):  # a block's body
            mapping[array.name] = AtLayer(H, sp.Symbol(self.labels[value]))  # or another input
            if not item.body:
                mapping["d" + array.name] = self.delta_of(value, item.name)
        mapping[form.output.name] = AtLayer(H, label)
        mapping["d" + form.output.name] = Delta(label)
        mapping["d" + form.inputs[0].name] = Delta(before)
        for param in form.params:
            mapping["d" + param.name] = Grad(AtLayer(sp.Symbol(param.name), label))
        return {sp.Symbol(k, real=True): v for k, v in mapping.items()}

    def _lowered(self, derivation: LayerDerivation, expr, indices):
        """The whole-array form, or ``None`` where matrix notation has none that reads well
        (sliding windows of convolution and pooling: those layers are written in index form)."""
        names = set(derivation.form.arrays) | {derivation.upstream.name}
        try:
            lowered = Lowering(names, derivation.form).lower(expr, indices)
        except DerivationError:
            return None
        shapes = {name: a.dims for name, a in derivation.form.arrays.items()}
        return _readable(lowered, {**shapes, **{f"d{k}": v for k, v in shapes.items()}})

    def _index_form(self, derived: DerivedLayer, expr):
        """An index-form expression of a layer in network names: ``x_{ncpq}`` of layer 2 is
        ``h^{(1)}_{ncpq}``, its ``dy_{ncpq}`` is ``\\delta^{(2)}_{ncpq}``."""
        names = {k.name: v for k, v in self._network_names(derived).items()}

        def element(e):
            node = names[e.base.name]
            if isinstance(node, Grad):
                return Grad(Element(node.args[0], *e.indices))
            return Element(node, *e.indices)

        return expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base.name in names, element
        )

    # -- forward pass ---------------------------------------------------------------------------
    def _forward(self) -> dict[str, Any]:
        whole = self.whole_printer()
        index = self.network_index_printer()
        rows = [whole.rows([(AtLayer(H, sp.Symbol("0")), sp.Symbol("x"))])]
        by_name = {d.name: d for d in self.derivation.layers}

        for step in self.plan.forward:  # a block's body before the block's sum
            derived = by_name[step.name]
            if derived.derivation.cell is not None:  # unrolled over time: its recurrence
                rows.append(whole.rows(self.recurrent_forward(derived)))
                continue
            names = self._network_names(derived)
            stages = derived.derivation.form.stages
            lowered = [self._lowered(derived.derivation, s.expr, s.indices) for s in stages]
            if any(rhs is None for rhs in lowered):  # the whole layer in index form
                lowered = [None] * len(stages)
            for stage, rhs in zip(stages, lowered, strict=True):
                if rhs is None:  # index form
                    lhs = self._index_form(derived, stage.array[stage.indices])
                    rows.append(index.rows([(lhs, self._index_form(derived, stage.expr))]))
                    continue
                rows.append(
                    whole.rows(
                        [(names[sp.Symbol(stage.name, real=True)], rhs.xreplace(names))]
                    )
                )

        generic = whole.equation(
            AtLayer(H, sp.Symbol("l")), Apply(sp.Symbol("l"), AtLayer(H, sp.Symbol("l-1")))
        )
        composition = whole.equation(
            sp.Symbol("o"), Compose(sp.Symbol("L"), sp.Symbol("1"), sp.Symbol("x"))
        )
        return {"generic": generic, "composition": composition, "rows": ROW_SEPARATOR.join(rows)}

    # -- per layer ------------------------------------------------------------------------------
    def _layers(self) -> list[dict[str, Any]]:
        sections = []
        first_of: dict[int, str] = {}
        for derived in self.derivation.layers:
            item, derivation = derived.placed, derived.derivation
            label = self.labels[item.name]
            section: dict[str, Any] = {
                "label": label,
                "name": _text(item.name, self.fmt),
                "type": _text(item.layer.describe(), self.fmt),
                "same_as": None,
            }
            if derivation.cell is not None:  # unrolled over time: its cell, at step t
                section["local"] = self.recurrent_local(derived)
                parts = [DerivedLayer(item, part, None) for part in derivation.parts]
            else:
                names, form = self._network_names(derived), derivation.form
                section["local"] = ", ".join(self.whole_printer(form.arrays).equation(
                    sp.Symbol(a.name, real=True), names[sp.Symbol(a.name, real=True)])
                    for a in (*form.inputs, form.output.array))
            section["unrolled"] = derivation.cell is not None
            if id(derivation) in first_of:
                section["same_as"] = first_of[id(derivation)]
                sections.append(section)
                continue
            first_of[id(derivation)] = label
            section.update(self._layer_math(derived) if derivation.cell is None else
                           merged_math([self._layer_math(part) for part in parts]))
            sections.append(section)
        return sections

    def _layer_math(self, derived: DerivedLayer) -> dict[str, Any]:
        derivation = derived.derivation
        form = derivation.form
        index = self.index_printer(derivation)
        whole = self.whole_printer(form.arrays)
        multi = len(form.stages) > 1
        math: dict[str, Any] = {
            "forward": index.rows([(s.array[s.indices], s.expr) for s in form.stages]),
            "constants": [index.equation(s, v) for s, v in derived.constants.items()],
            "eval": None,
            "multi_stage": multi,
            "staged": None,
            "identities": [],
            "proven": None,
        }
        if derived.eval_form is not None:
            printer = self.index_printer_for(derived.eval_form)
            math["eval"] = printer.rows(
                [(s.array[s.indices], s.expr) for s in derived.eval_form.stages]
            )
        if multi:
            math["staged"] = index.rows([(a.lhs, a.expr) for a in derivation.staged])
            math["identities"] = [index.equation(r.lhs, r.rhs) for r in derivation.identities]
        index_rows, whole_rows, steps = [], [], []
        for name, adjoint in derivation.vjp.items():
            lowered = self._lowered(derivation, adjoint.expr, adjoint.indices)
            index_rows.append((adjoint.lhs, adjoint.expr))
            if lowered is not None:
                whole_rows.append((sp.Symbol(adjoint.name, real=True), lowered))
            trail = derivation.steps.get(name, [])
            if self.steps and len(trail) > 1:
                steps.append(
                    [
                        {"what": description, "rows": index.rows([(adjoint.lhs, expr)])}
                        for description, expr in trail
                    ]
                )
        math["vjp"] = index.rows(index_rows)
        math["vjp_whole"] = whole.rows(whole_rows) if whole_rows else None
        math["index_only"] = len(whole_rows) < len(index_rows)
        math["windows"] = bool(form.window_dims)
        convolution = _full_convolution(derivation)
        math["full_convolution"] = (
            index.rows([(derivation.vjp[form.inputs[0].name].lhs, convolution)])
            if convolution is not None
            else None
        )
        math["steps"] = steps
        math["stored"] = [
            whole.doprint(sp.Symbol(name, real=True)) for name in derivation.stored
        ]
        compact = _proven(derivation, staged=False)
        staged = _proven(derivation, staged=True) if multi else compact
        math["proven"] = compact and staged
        shown = [
            (symbol, value)
            for symbol, value in proof_sizes(derivation, VERIFY_BATCHES[0]).items()
            if symbol.name == "N" or _spatial(symbol)
        ]
        math["proof_sizes"] = ", ".join(
            index.equation(symbol, sp.Integer(value)) for symbol, value in shown
        )
        claim = derived.placed.layer.adjoint_of(derived.placed.in_shape)
        verdicts = prove_adjoint(derived.placed.layer, derived.placed.in_shape) if claim else []
        math["adjoint"] = claim and {"of": claim.statement, "partner": claim.partner.kind,
                                     "proven": all(v.proven for v in verdicts)}
        return math

    def index_printer_for(self, form) -> NotesLatexPrinter:
        return NotesLatexPrinter({**self.settings, "arrays": set(form.arrays)})

    # -- loss -----------------------------------------------------------------------------------
    def _loss(self) -> dict[str, Any] | None:
        derivation = self.derivation.loss
        if derivation is None:
            return None
        form = derivation.form
        index = self.index_printer(derivation)
        whole = self.whole_printer(form.arrays)
        adjoint = derivation.vjp[form.inputs[0].name]
        lowered = self._lowered(derivation, adjoint.expr, adjoint.indices)
        return {
            "kind": _text(self.net.loss.kind, self.fmt),
            "forward": index.rows([(s.array[s.indices], s.expr) for s in form.stages]),
            "index": index.rows([(adjoint.lhs, adjoint.expr)]),
            "whole": whole.rows([(sp.Symbol(adjoint.name, real=True), lowered)])
            if lowered is not None
            else None,
            "output": whole.equation(
                sp.Symbol(form.inputs[0].name, real=True), AtLayer(H, sp.Symbol(self.depth))
            ),
        }
