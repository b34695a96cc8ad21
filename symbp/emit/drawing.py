"""The computational graph drawn from the network plan (``symbp graph``).

The drawing reads :func:`~symbp.derivation.plan.build_plan`'s plan, nothing else: a node per
network input, per forward step (its name, its layer's kind, its output shape per sample), per
parameter (optional) and one for the loss; an edge per value a step reads. A value read by
several steps (``plan.readers``) goes through a fan-out node ``Σ``: on the way back its gradient
is the sum of what each reader hands back (the plan's :class:`~symbp.derivation.plan.Sum`). A
parameter shared by several steps gets the same mark.

With an :class:`Example` (a tiny numeric run, :mod:`symbp.checking.example`), each edge carries
the value flowing forward (green, above) and the gradient flowing back (red, below), as cs231n's
circuit diagrams do. The ``.dot`` source and the TikZ picture come from jinja2 templates
(``templates/graph.dot.j2``, ``templates/graph.tex.j2``); ``.svg``/``.png``/``.pdf`` are the
``.dot`` source laid out by graphviz (the optional extra ``symbp[graph]`` and the ``dot``
program).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..derivation.plan import Plan
from ..errors import SpecError

#: the output formats graphviz renders
RENDERED = (".svg", ".png", ".pdf")
FORMATS = (".dot", ".tex", *RENDERED)
#: arrays with more entries are summarized by their norm
ENTRIES = 3
COLUMN, ROW = 3.6, 2.0  # TikZ spacing (cm) of the ranks and of the rows within one
INSTALL = "apt-get install graphviz and pip install 'symbp[graph]'"


@dataclass
class Example:
    """A numeric run of the network on one sample: each value and its (summed) gradient, the part
    of a value's gradient each reader hands back, the parameters and their gradients."""

    values: dict[str, np.ndarray]  # value name -> array, batch of 1
    grads: dict[str, np.ndarray]  # value name -> dL/dvalue (every reader's part summed)
    parts: dict[tuple[str, str], np.ndarray]  # (value or parameter, step) -> that step's part
    params: dict[str, np.ndarray]
    param_grads: dict[str, np.ndarray]
    loss: float | None
    seed: int = 0


@dataclass
class Node:
    id: str
    role: str  # "input", "step", "fanout", "param", "loss"
    lines: list[str]
    rank: int = 0
    row: int = 0
    x: float = 0.0  # the TikZ position (cm)
    y: float = 0.0


@dataclass
class Edge:
    tail: str
    head: str
    value: str  # the plan's value (or parameter key) it carries
    forward: np.ndarray | None = None
    backward: np.ndarray | None = None
    param: bool = False  # a parameter read by a step

    @property
    def forward_text(self) -> str:
        return summary(self.forward)

    @property
    def backward_text(self) -> str:
        return summary(self.backward)


@dataclass
class Drawing:
    title: str
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    example: Example | None = None

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)


def summary(array: np.ndarray | None) -> str:
    """A few entries (``[0.12 -0.5]``), or the norm of a larger array (``norm 1.23``)."""
    if array is None:
        return ""
    flat = np.asarray(array, dtype=float).ravel()
    if flat.size == 1:
        return _number(flat[0])
    if flat.size <= ENTRIES:
        return "[" + " ".join(_number(v) for v in flat) + "]"
    return f"norm {_number(float(np.linalg.norm(flat)))}"


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def _shape(shape) -> str:
    if shape and isinstance(shape[0], tuple):  # several inputs: the output's shape is what counts
        shape = shape[0]
    return " x ".join(str(s) for s in shape) if shape else "scalar"


def build_drawing(plan: Plan, *, params: bool = False, example: Example | None = None) -> Drawing:
    """The nodes and edges of ``plan``'s graph (with ``example``: the numbers on the edges)."""
    drawing = Drawing(title=plan.net.name, example=example)
    producer: dict[str, str] = {}
    for i, name in enumerate(plan.inputs):
        node = Node(f"in{i}", "input", [name, _shape(plan.net.inputs[name])])
        drawing.nodes.append(node)
        producer[name] = node.id
    ex = example

    def flow(tail: str, head: str, value: str, part_of: str | None) -> Edge:
        edge = Edge(tail, head, value)
        if ex is not None:
            edge.forward = ex.values[value][0]
            grad = ex.grads.get(value) if part_of is None else ex.parts.get((value, part_of))
            edge.backward = None if grad is None else grad[0]
        drawing.edges.append(edge)
        return edge

    fanout: dict[str, str] = {}

    def source(value: str, reader: str) -> str:
        """The node a reader's edge leaves: the producer, or the value's fan-out node."""
        if len(plan.readers.get(value, ())) < 2:
            return producer[value]
        if value not in fanout:
            node = Node(f"sum{len(fanout)}", "fanout", ["Σ"])
            drawing.nodes.append(node)
            fanout[value] = node.id
            flow(producer[value], node.id, value, None)  # the whole gradient: the sum
        return fanout[value]

    for i, step in enumerate(plan.forward):
        node = Node(f"s{i}", "step", [step.name, step.layer.kind, _shape(step.placed.out_shape)])
        tails = [source(value, step.name) for value in step.inputs]  # fan-out nodes first
        drawing.nodes.append(node)
        for value, tail in zip(step.inputs, tails, strict=True):
            several = len(plan.readers.get(value, ())) > 1
            flow(tail, node.id, value, step.name if several else None)
        producer[step.output] = node.id
    if params:
        _add_params(drawing, plan)
    loss = plan.net.loss
    end = Node("loss", "loss", [f"loss: {loss.kind}"] if loss is not None else ["output"])
    if ex is not None and ex.loss is not None:
        end.lines.append(f"L = {_number(ex.loss)}")
    drawing.nodes.append(end)
    flow(producer[plan.output], end.id, plan.output, None)
    _layout(drawing)
    return drawing


def _add_params(drawing: Drawing, plan: Plan) -> None:
    ex = drawing.example
    users, shapes = {}, {}
    for i, step in enumerate(plan.forward):
        owned = step.layer.param_shapes(step.placed.in_shape)
        for key, array in zip(step.params, step.derivation.form.params, strict=True):
            users.setdefault(key, []).append((f"s{i}", step.name))
            shapes.setdefault(key, owned.get(array.name, ()))
    for j, (key, steps) in enumerate(users.items()):
        lines = [key, _shape(shapes[key])]
        if len(steps) > 1:
            lines.append("shared: Σ of grads")
        node = Node(f"p{j}", "param", lines)
        drawing.nodes.append(node)
        for node_id, name in steps:
            edge = Edge(node.id, node_id, key, param=True)
            if ex is not None:
                edge.forward = ex.params[key]
                edge.backward = ex.parts[(key, name)]
            drawing.edges.append(edge)


def _layout(drawing: Drawing) -> None:
    """A layered layout for TikZ (graphviz lays out the other formats itself): a node's rank is
    one more than its inputs' (a parameter sits one rank before its first reader), then rows
    in order within each rank."""
    roles = {n.id: n.role for n in drawing.nodes}
    into: dict[str, list[str]] = {}
    for edge in drawing.edges:
        if roles[edge.tail] != "param":
            into.setdefault(edge.head, []).append(edge.tail)
    rank: dict[str, int] = {}
    params = [n for n in drawing.nodes if n.role == "param"]
    for node in drawing.nodes:  # the nodes come in an order where a node's inputs come first
        if node.role == "param":
            continue
        tails = into.get(node.id, [])
        rank[node.id] = 1 + max((rank[t] for t in tails), default=-1)
    for node in params:
        heads = [e.head for e in drawing.edges if e.tail == node.id]
        rank[node.id] = max(min(rank[h] for h in heads) - 1, 0)
    rows: dict[int, int] = {}
    for node in drawing.nodes:
        node.rank = rank[node.id]
        node.row = rows.get(node.rank, 0)
        rows[node.rank] = node.row + 1
    for node in drawing.nodes:  # each rank's column centred
        node.x = COLUMN * node.rank
        node.y = -ROW * (node.row - (rows[node.rank] - 1) / 2)


# -- text ---------------------------------------------------------------------------------------
def _dot_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#",
        "$": r"\$", "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\~{}", "Σ": r"$\Sigma$"}


def _tex_text(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def render_dot(drawing: Drawing) -> str:
    """The graphviz source."""
    import jinja2  # the default delimiters: graphviz's HTML labels are full of << and >>

    from . import template_folder

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_folder()), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    env.filters["esc"] = _dot_text
    return env.get_template("graph.dot.j2").render(drawing=drawing)


def render_tikz(drawing: Drawing, *, standalone: bool = True) -> str:
    """A TikZ picture of the layered layout (``standalone``: a whole LaTeX document)."""
    from .notes import _environment

    env = _environment()
    env.filters["esc"] = _tex_text
    return env.get_template("graph.tex.j2").render(drawing=drawing, standalone=standalone)


def render_graph(drawing: Drawing, suffix: str) -> bytes:
    """The drawing in the format of a file name's ``suffix`` (``.dot``, ``.tex``, ``.svg``,
    ``.png``, ``.pdf``); a rendered format without graphviz is a one-line :class:`SpecError`."""
    suffix = suffix.lower()
    if suffix == ".dot":
        return render_dot(drawing).encode("utf-8")
    if suffix == ".tex":
        return render_tikz(drawing).encode("utf-8")
    if suffix not in RENDERED:
        raise SpecError(
            f"cannot tell the format from the file name (one of {', '.join(FORMATS)})",
            field="-o",
        )
    try:
        import graphviz
    except ImportError:
        raise SpecError(f"writing {suffix} needs graphviz: {INSTALL} (.dot and .tex need "
                        "neither)", field="-o") from None
    try:
        return graphviz.Source(render_dot(drawing)).pipe(format=suffix[1:])
    except graphviz.ExecutableNotFound:
        raise SpecError(f"writing {suffix} needs graphviz's dot program: {INSTALL} (.dot and "
                        ".tex need neither)", field="-o") from None
