"""Generate a stand-alone NumPy module for a network.

The module's structure comes from ``templates/module.py.j2`` and ``templates/function.py.j2``;
every expression in it comes from the engine's derivation, lowered to whole-array form
(:mod:`symbp.derivation.arrays`), made numerically safe
(:func:`~symbp.derivation.stable.stabilize`),
shared where it repeats (sympy ``cse``) and printed by :class:`SymbpNumPyPrinter`.
One forward/backward function pair is emitted per distinct layer math (every ``linear`` layer
calls ``linear_forward``), and the network's ``forward``/``backward`` call them in order.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import jinja2
import sympy as sp

from ..declare.forms import Forward
from ..declare.layers import Layer
from ..declare.net import Net, Placed
from ..derivation.arrays import Lowering
from ..derivation.broadcast import filled
from ..derivation.kept import carried_read
from ..derivation.layer import Carried, LayerDerivation
from ..derivation.network import NetworkDerivation, derive_cached, derive_network
from ..derivation.plan import build_plan
from ..derivation.readings import computed_form, reading
from ..derivation.stable import softmax_of_stages, stabilize
from ..naming import (
    adjoint,
    backward_function,
    forward_function,
    predict_function,
    state_update_function,
)
from ..runtime import registry as runtime
from ..version import __version__
from . import template_folder
from .array_shapes import array_shape
from .graph_vars import template_inputs
from .kept_values import _argmax_from_maxima, _kept_type
from .layout import MAX_LINE, _sentence, formula, wrap_line, wrap_lines
from .memory_plan import (
    _dependency_order,
    _has_array,
    _is_fresh,
    _only_for,
    _place_rows,
    _reuse_memory,
    _Statement,
    spread_factors,
)
from .network import backward_steps, forward_steps, inits
from .numpy_printer import SymbpNumPyPrinter, accurate_forms, float_constants
from .objective import regularizer_context
from .sizes import _array_shapes, _size_bindings, _with_sizes
from .unrolled import unrolled_functions
from .value_names import _renamed, value_name
from .windows import _name_windows


def _live(outputs: list[tuple[str, sp.Expr]], returned: set[str]) -> list[tuple[str, sp.Expr]]:
    """The ``(name, value)`` pairs a function must compute: those it returns and those a later
    one reads (a softmax's ``lse``, once its output reads the shifted exponentials, is not)."""
    needed, live = set(returned), []
    for name, value in reversed(outputs):
        if name in needed:
            live.append((name, value))
            needed |= {symbol.name for symbol in value.free_symbols}
    return live[::-1]


OVERWRITE_NOTE = "overwrite=True: {name} may be overwritten (the caller no longer needs it)."
OUT_NOTE = "an array to write that gradient into (else a new one is made)."


def environment() -> jinja2.Environment:
    """The jinja2 environment over the templates shipped in the package."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_folder()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["wrap_lines"] = wrap_lines
    return env


@dataclass
class _Function:
    """What one generated function needs: its code and how to call it."""

    name: str
    source: str

class ModuleBuilder:
    """Collects the layer functions and the network's forward/backward lines."""

    #: the expressions' printer; another target's (torch) names its own, without ``out=``
    printer_class = SymbpNumPyPrinter
    reuses_memory = True
    #: the loop over t of a layer unrolled over time (:mod:`.unrolled`), and how its
    #: docstrings name the loop (JAX: " with jax.lax.scan")
    unrolled_template = "unrolled.py.j2"
    unrolled_loop = ""
    array_module = "np"  # what the printed code calls for arrays (np.stack, torch.stack)

    def __init__(self, derivation: NetworkDerivation | None, stems: dict | None = None):
        """``derivation`` None: a builder of layer functions alone (see :func:`function_stems`)."""
        self.derivation = derivation
        self.net = derivation.net if derivation is not None else None
        self.env = environment()
        self.functions: dict[str, _Function] = {}
        #: The runtime helpers the printed code calls (symbp.runtime; their own calls follow).
        self.helpers: set[str] = set()
        self.forward_lines: list[str] = []
        self.backward_lines: list[str] = []
        self.uses_rng = False
        self.uses_state = False
        #: function name -> whether it takes ``overwrite=`` (may compute in its first argument)
        self.overwrites: dict[str, bool] = {}
        self.size_keywords: dict[str, list[str]] = {}  # sizes a function takes as keywords
        self.unbound: list[str] = []
        #: stem -> whether the forward output / the input gradient is a new array nobody else
        #: holds (the caller may then let the next function overwrite it)
        self.owned_output: dict[str, bool] = {}
        self.owned_grad: dict[str, bool] = {}
        #: backward function -> parameters whose gradient it can write into ``d<param>_out``
        self.outs: dict[str, list[str]] = {}
        #: stem -> the name of its forward function (another stem's, when they read the same)
        self.forward_names: dict[str, str] = {}
        self.forward_sources: dict[tuple, str] = {}  # (type, base stem, source) -> its name
        self.stems = stems if stems is not None else function_stems(self.net)
        self.h_owned = False  # h is a new array that nothing else holds (forward lines)
        self.dh_owned = False  # the same for dh (backward lines)

    # -- layer functions ----------------------------------------------------------------------
    def _render_function(
        self, name, signature, summary, formulas, statements, returns, optional=(), notes=()
    ):
        """One function; ``optional``: targets computed only ``if input_grad``."""
        template = self.env.get_template("function.py.j2")
        lines = [
            wrapped
            for st in statements
            for line in st.lines(st.target in optional)
            for wrapped in wrap_line(line, MAX_LINE - 4)  # the template indents the body
        ]
        returned = f"return {returns}"
        if len(returned) > MAX_LINE - 4:  # many gradients (an LSTM part's fifteen)
            returned = f"return ({returns})"
        return template.render(
            name=name,
            header="\n".join(wrap_line(f"def {name}({signature}):")),
            summary=summary,
            formulas=formulas,
            notes=[part for note in notes  # a long note (six _out keywords) wrapped
                   for part in textwrap.wrap(note, MAX_LINE - 4, subsequent_indent="    ")],
            lines=lines,
            returns=wrap_line(returned, MAX_LINE - 4),
        ).rstrip("\n")

    def _printed(
        self,
        outputs: list[tuple[str, sp.Expr]],
        form: Forward,
        available: list[str],
        returned: set[str] | None = None,
        writable: str | None = None,
        into: set[str] = frozenset(),
        carried: tuple[Carried, ...] = (),
    ) -> list[_Statement]:
        """Statements for named outputs, repeated sub-expressions computed once, in order.

        With ``returned`` (the names the function returns), a big array that nothing reads
        afterwards lends its memory to the next element-wise result computed from it (NumPy's
        ``out=``); so does the argument ``writable`` when the caller passes ``overwrite=True``.
        """
        shapes = _array_shapes(form)
        shapes.update({c.name: tuple(c.array.dims) for c in carried})
        exprs = [spread_factors(accurate_forms(float_constants(e)), shapes) for _, e in outputs]
        named, exprs = _name_windows(exprs)
        outputs = [*named, *outputs]
        exprs = [value for _, value in named] + exprs
        replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("common"), order="none")
        # Trivial common values (1/N) read better inline.
        trivial = {s: v for s, v in replacements if sp.count_ops(v) <= 1 and not _has_array(v)}
        kept = [(s, v) for s, v in replacements if s not in trivial]
        renames = {s: sp.Symbol(f"common{i}") for i, (s, _) in enumerate(kept)}
        trivial = {s: v.xreplace(renames) for s, v in trivial.items()}
        renames.update(trivial)
        # The others are named after what they compute (sum_dy), unique in the function. The
        # names replace the placeholders ``common<i>`` in the printed code: sympy orders the
        # terms of a sum by their symbols' names, and the order of a floating-point sum is
        # part of its value.
        taken = {t for t, _ in outputs} | set(available)
        taken |= {s.name for e in exprs for s in e.free_symbols}
        described = dict(trivial)
        names = {}
        for s, v in kept:
            names[str(renames[s])] = value_name(v.xreplace(described), taken)
            described[s] = sp.Symbol(names[str(renames[s])])
        items = [(str(renames[s]), v.xreplace(renames)) for s, v in kept]
        items += [(t, v.xreplace(renames)) for (t, _), v in zip(outputs, reduced, strict=True)]
        ordered = _dependency_order(items, set(available))
        for target, value in ordered:
            shapes.setdefault(target, array_shape(value, shapes))
        ordered = _place_rows(ordered, shapes)
        printer = self.printer_class(shapes=shapes)
        printer.bool_arrays = frozenset(c.name for c in carried if c.dtype == "bool")
        if returned is None or not self.reuses_memory:
            statements = [_Statement(t, printer.doprint(v), fresh=_is_fresh(v)) for t, v in ordered]
        else:
            statements = _reuse_memory(ordered, shapes, returned, writable, printer, into)
        self.helpers |= printer.helpers_used
        sizes, self.unbound = _size_bindings([v for _, v in ordered], form, available)
        return [_Statement(t, code) for t, code in sizes] + [
            _renamed(st, names) for st in statements
        ]

    def layer_functions(self, stem: str, layer: Layer, derivation: LayerDerivation, eval_form):
        if stem in self.forward_names:
            return
        if derivation.cell is not None:  # a layer unrolled over time (rnn, lstm)
            return unrolled_functions(self, stem, layer, derivation)
        form = derivation.form
        names = set(form.arrays) | {derivation.upstream.name}
        lowering = Lowering(names, form)

        def keywords(exprs):
            used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
            names = [s.name for s in form.constants if s in used]
            return (", *, " + ", ".join(names)) if names else ""

        # forward (computing the carried values once, for both passes)
        carried = derivation.carried
        kept = {c.expr: c.array[c.indices] for c in carried}
        # a value computed from another carried value comes after it
        computed = sorted(carried, key=lambda c: sum(c.expr.has(o.expr) for o in carried))
        outputs = [
            (c.name, _kept_type(c, lowering.lower(
                (c.expr if c.computed is None else c.computed).xreplace(_without(kept, c.expr)),
                c.indices)))
            for c in computed
        ]
        outputs += [
            (s.name, lowering.lower(
                softmax_of_stages(stabilize(s.expr).xreplace(kept), form.stages), s.indices))
            for s in form.stages
        ]
        outputs = _argmax_from_maxima(outputs)
        cached = [array.name for array in derivation.cached]
        outputs = _live(outputs, {form.output.name, *cached, *layer.train_returns})
        args = [a.name for a in form.inputs + form.params + form.aux]
        kw = keywords([e for _, e in outputs])
        returns = f"{form.output.name}, ({', '.join(cached)}{',' if len(cached) == 1 else ''})"
        returned = {form.output.name, *cached}
        if layer.train_returns:  # declared: what the state update reads (batch norm's mu, var)
            returns += f", ({', '.join(layer.train_returns)})"
            returned |= set(layer.train_returns)
        writable = form.inputs[0].name if len(form.inputs) == 1 else None
        writable = writable if writable not in cached else None
        statements = self._printed(outputs, form, args, returned, writable, carried=carried)
        kw = _with_sizes(kw, self.unbound)
        self.size_keywords[forward_function(stem)] = self.unbound
        overwrites = any(st.overwrites for st in statements)
        if overwrites:
            kw += (", " if kw else ", *, ") + "overwrite=False"
        self.overwrites[forward_function(stem)] = overwrites
        output = next(st for st in statements if st.target == form.output.name)
        self.owned_output[stem] = output.fresh and form.output.name not in cached
        source = self._render_function(
            forward_function(stem),
            ", ".join(args) + kw,
            f"Forward pass of {_title(layer)}; returns the output and what backward needs.",
            # in the order they are computed: a kept step of the output after the output
            [formula(c.array[c.indices], c.math) for c in computed if c.dtype != "bool"]
            + [formula(s.array[s.indices], s.expr) for s in form.stages]
            + [formula(c.array[c.indices], c.math) for c in computed if c.dtype == "bool"],
            statements,
            returns,
            notes=[OVERWRITE_NOTE.format(name=writable)] if overwrites else [],
        )
        # One layer's math under two stems (a convolution whose input gradient is computed two
        # ways, chosen by its sizes) shares one forward function when the two read the same.
        key = (type(layer), layer.function_stem, source.replace(forward_function(stem), "{name}"))
        twin = self.forward_sources.setdefault(key, forward_function(stem))
        if twin == forward_function(stem):
            self.functions[twin] = _Function(twin, source)
        self.forward_names[stem] = twin

        # backward
        upstream = derivation.upstream.name
        params_read = [p.name for p in derivation.params_read]
        grads = [(adjoint(a.name), derivation.vjp[a.name]) for a in form.differentiable]
        # the gradients of the stages the others read by name (attention's dq), computed first
        through = [(a.name, a) for a in derivation.through.values()]
        exprs = [computed_form(a.expr, upstream, form.gather) for _, a in through + grads]
        outputs = [
            (t, filled(lowering.lower(carried_read(stabilize(e), carried), a.indices), e,
                       a.indices, form.arrays[a.array.name].dims))
            for (t, a), e in zip(through + grads, exprs, strict=True)
        ]
        exprs = exprs[len(through):]
        kw = keywords([e for _, e in outputs])
        # A loss is the last node: its upstream gradient is 1 and not an argument.
        given = [upstream] if form.output.array.dims else []
        statements = self._printed(
            outputs,
            form,
            [*given, *cached, *params_read],
            {t for t, _ in grads},
            upstream if given else None,
            {adjoint(p.name) for p in form.params},
            carried=carried,
        )
        kw = _with_sizes(kw, self.unbound)
        self.size_keywords[backward_function(stem)] = self.unbound
        signature = ", ".join([*given, *cached, *params_read]) + kw
        optional = ()
        if form.params and form.differentiable != form.params:  # an input gradient to skip
            signature += (", " if kw else ", *, ") + "input_grad=True"
            optional = _only_for({adjoint(a.name) for a in form.inputs}, statements)
        overwrites = any(st.overwrites for st in statements)
        if overwrites:
            signature += (", " if "*" in signature else ", *, ") + "overwrite=False"
        self.overwrites[backward_function(stem)] = overwrites
        outs = [st.target for st in statements if st.into]
        for target in outs:
            signature += (", " if "*" in signature else ", *, ") + f"{target}_out=None"
        self.outs[backward_function(stem)] = [t[1:] for t in outs]
        notes = [OVERWRITE_NOTE.format(name=upstream)] if overwrites else []
        for (target, _), expr in zip(grads, exprs, strict=True):
            plain = reading(expr, upstream)  # what the derivation says the formula computes
            if plain is not None:
                notes.append(_sentence(f"{target}: {plain}."))
        for c in carried:
            notes.append(f"{formula(c.array[c.indices], c.math)}, kept by the forward pass.")
        if outs:
            notes.append(f"{', '.join(t + '_out' for t in outs)}: {OUT_NOTE}")
        first = adjoint(form.differentiable[0].name)
        self.owned_grad[stem] = any(st.target == first and st.fresh for st in statements)
        self.functions[backward_function(stem)] = _Function(
            backward_function(stem),
            self._render_function(
                backward_function(stem),
                signature,
                f"Backward pass of {_title(layer)}, derived by symbp"
                + (f": gradients from {upstream}." if given else ": gradient of the loss."),
                [formula(a.lhs, a.expr) for _, a in through]
                + [formula(a.lhs, e) for (_, a), e in zip(grads, exprs, strict=True)],
                statements,
                ", ".join(t for t, _ in grads),
                optional,
                notes,
            ),
        )

        # evaluation mode
        if eval_form is not None:
            low = Lowering(set(eval_form.arrays), eval_form)
            stage = eval_form.output
            outputs = [(stage.name, low.lower(stabilize(stage.expr), stage.indices))]
            eval_constants = [s.name for s in eval_form.constants]
            args = [a.name for a in eval_form.inputs + eval_form.params + eval_form.aux]
            ekw = (", *, " + ", ".join(eval_constants)) if eval_constants else ""
            low.preferred = ()
            self.functions[predict_function(stem)] = _Function(
                predict_function(stem),
                self._render_function(
                    predict_function(stem),
                    ", ".join(args) + ekw,
                    f"Evaluation-mode forward pass of {_title(layer)}.",
                    [formula(stage.array[stage.indices], stage.expr)],
                    self._printed(outputs, eval_form, args),
                    stage.name,
                ),
            )

    def state_update_function(self, stem: str, layer: Layer) -> str:
        """``<stem>_running_stats``: the layer's declared state update, printed once."""
        name = state_update_function(stem)
        if name in self.functions:
            return name
        updates = layer.state_updates()
        printer = self.printer_class()
        assignments = [_Statement(f"new_{k}", printer.doprint(v)) for k, v in updates.items()]
        used = {s.name for e in updates.values() for s in e.free_symbols}
        constants = [k for k in layer.constant_values() if k in used]
        signature = ", ".join([*updates, *layer.train_returns, "N"])
        if constants:
            signature += ", *, " + ", ".join(constants)
        self.functions[name] = _Function(
            name,
            self._render_function(
                name,
                signature,
                layer.state_update_doc,
                [f"{k} <- {v}" for k, v in updates.items()],
                assignments,
                ", ".join(st.target for st in assignments),
            ),
        )
        return name


def _title(layer: Layer) -> str:
    """What a layer function's docstring calls its layer: the user's name for a layer whose
    functions carry it (a custom activation ``mish``), else the layer type (``linear``)."""
    return layer.name if layer.name is not None and layer.function_stem == layer.name else (
        layer.kind
    )


def _without(mapping: dict, key) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def function_stems(net: Net) -> dict[str | None, str]:
    """The stem of each layer's generated functions, by layer name (``None``: the loss).

    One stem per distinct layer math (layers with the same math share their functions). A
    type's own stem (``linear``, ``batchnorm``) goes to that type first; a layer named by the
    user (a custom activation) is called by its name, or ``<name>_<kind>`` when that name is
    another type's stem; two different maths that would share a stem (two unnamed custom
    activations) get ``_2``, ``_3``, ... in order. A layer type on inputs of two ranks whose
    functions print the same (``relu`` on images and on feature vectors) has one stem.
    """
    entries: list[tuple[str | None, tuple, str, bool, Placed | None]] = []
    for item in net.walk():
        layer = item.layer
        stem = layer.stem_for(item.in_shape)
        identity = (type(layer), layer.math_key(item.in_shape), stem)
        named = layer.name is not None and stem == layer.name != layer.kind
        entries.append((item.name, identity, stem, named, item))
    if net.loss is not None:
        loss = net.loss
        entries.append((None, (type(loss), loss.kind), loss.function_stem, False, None))
    by_identity: dict[tuple, str] = {}
    taken: set[str] = set()
    placed: dict[tuple, Placed] = {}  # identity -> a layer of that math (to print its functions)
    printed: dict[tuple, tuple[str, ...]] = {}
    for want_named in (False, True):  # the types' own stems first
        for _, identity, preferred, named, item in entries:
            if named != want_named or identity in by_identity:
                continue
            if item is not None:
                placed[identity] = item
            same = [
                other for other, stem in by_identity.items()
                if other[0] == identity[0] and other[2] == identity[2] and other in placed
                and item is not None
                and _printed_functions(placed[other], printed)
                == _printed_functions(item, printed)
            ]
            if same:
                by_identity[identity] = by_identity[same[0]]
                continue
            stem = preferred
            if stem in taken and named:
                stem = f"{preferred}_{identity[0].kind}"
            count = 1
            base = stem
            while stem in taken:
                count += 1
                stem = f"{base}_{count}"
            by_identity[identity] = stem
            taken.add(stem)
    return {name: by_identity[identity] for name, identity, _, _, _ in entries}


def _printed_functions(item: Placed, printed: dict) -> tuple[str, ...]:
    """The source of the functions of ``item``'s layer math, its stem left out (cached in
    ``printed`` by the layer's identity)."""
    layer = item.layer
    key = (type(layer), layer.math_key(item.in_shape), layer.stem_for(item.in_shape))
    if key not in printed:
        builder = ModuleBuilder(None, stems={})
        stem = "symbp_stem"
        builder.layer_functions(
            stem, layer, derive_cached(layer, item.in_shape), layer.eval_form(item.in_shape)
        )
        printed[key] = tuple(
            f.source.replace(stem, "{stem}") for f in builder.functions.values()
        )
    return printed[key]


def generate_module(net: Net, derivation: NetworkDerivation | None = None) -> str:
    """The source of the generated module (deterministic: same net, same bytes)."""
    derivation = derivation or derive_network(net)
    builder = ModuleBuilder(derivation)
    plan = build_plan(net, derivation)
    forward = forward_steps(builder, plan)
    backward = backward_steps(builder, plan)
    loss = None
    if net.loss is not None:
        loss_derivation = derivation.loss
        assert loss_derivation is not None
        stem = builder.stems[None]
        builder.layer_functions(stem, net.loss, loss_derivation, None)
        target = "y"
        if net.loss.target_kind == "labels":  # one-hot rows, by the runtime's helper
            builder.helpers.add("_one_hot")
            target = "_one_hot(y, out)"
        loss = dict(
            kind=net.loss.kind,
            forward=forward_function(stem),
            backward=backward_function(stem),
            target=target,
            classes=net.output_shape[0] if net.loss.target_kind == "labels" else None,
        )
    decay = regularizer_context(builder, derivation)  # after the loss's functions
    summary = [f"{item.name}: {item.layer.describe()}" for item in derivation.layers]
    if net.loss is not None:
        summary.append(f"loss: {net.loss.kind}")
    helpers = runtime.closure(builder.helpers)
    state_initial = [
        (key, repr(float(step.layer.state_initial[key.rsplit(".", 1)[1]])))
        for step in plan.forward
        for key in step.state
    ]
    layers = list({type(step.layer): step.layer for step in plan.forward}.values())
    training_docs = [
        textwrap.fill(layer.training_doc, MAX_LINE - 4, initial_indent="    ",
                      subsequent_indent="    ")
        for layer in layers
        if layer.training_doc
    ]
    evaluation = "; ".join(layer.evaluation_doc for layer in layers if layer.evaluation_doc)
    evaluation_doc = ""
    if evaluation:
        evaluation_doc = f'    """Evaluation mode: {evaluation}."""'
        if len(evaluation_doc) > MAX_LINE:
            text = textwrap.fill(f"Evaluation mode: {evaluation}.", MAX_LINE - 4,
                                 initial_indent="    ", subsequent_indent="    ")
            evaluation_doc = f'    """{text.strip()}\n    """'
    refuses = [layer.too_few_values for layer in layers if layer.min_values_per_statistic > 1]
    template = builder.env.get_template("module.py.j2")
    source = template.render(
        threads="set_threads" in helpers,
        net=net,
        version=__version__,
        summary=summary,
        imports=runtime.imports(helpers),
        param_shapes={k: tuple(v) for k, v in net.param_shapes.items()},
        state_shapes={k: tuple(v) for k, v in net.state_shapes.items()},
        input_shape=tuple(net.input_shape),
        output_shape=tuple(net.output_shape),
        helpers=runtime.source(helpers),
        inits=inits(plan),
        functions=[f.source for f in builder.functions.values()],
        uses_rng=builder.uses_rng,
        uses_state=builder.uses_state,
        state_initial=state_initial,
        training_docs=training_docs,
        evaluation_doc=evaluation_doc,
        refuses_empty=refuses[0] if refuses else "",
        forward_steps=forward,
        backward_steps=backward,
        loss=loss,
        **template_inputs(plan, builder.variables),
        decay=decay,
    )
    return source
