"""Generate a stand-alone NumPy module for a network.

The module's structure comes from ``templates/module.py.j2`` and ``templates/function.py.j2``;
every expression in it comes from the engine's derivation, lowered to whole-array form
(:mod:`symbp.derive.arrays`), made numerically safe (:func:`~symbp.derive.arrays.stabilize`),
shared where it repeats (sympy ``cse``) and printed by :class:`SymbpNumPyPrinter`.
One forward/backward function pair is emitted per distinct layer math (every ``linear`` layer
calls ``linear_forward``), and the network's ``forward``/``backward`` call them in order.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from importlib import resources

import jinja2
import sympy as sp

from .. import __version__
from ..declare.forms import Forward
from ..declare.layers import BatchNorm, Elementwise, Layer, Rrelu
from ..declare.net import Net, Placed
from ..derive.arrays import Lowering, stabilize
from ..derive.layer import LayerDerivation
from ..derive.network import NetworkDerivation, derive_cached, derive_network
from .numpy_printer import SymbpNumPyPrinter, float_constants

RELU_LIKE = ("relu", "leaky_relu", "prelu", "rrelu", "elu")
MAX_LINE = 99


def environment() -> jinja2.Environment:
    """The jinja2 environment over the templates shipped in the package."""
    folder = resources.files("symbp.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


class _FormulaPrinter(sp.printing.str.StrPrinter):
    """One-line index formulas for docstrings: ``z[n, j] = sum_i(W[i, j]*x[n, i]) + b[j]``."""

    def _print_Sum(self, expr):
        indices = ", ".join(self._print(limit[0]) for limit in expr.limits)
        return f"sum_{indices}({self._print(expr.function)})"

    def _print_Heaviside(self, expr):
        return f"step({self._print(expr.args[0])})"


def formula(lhs: sp.Expr, rhs: sp.Expr) -> str:
    """``lhs = rhs`` on one line, or wrapped with a hanging indent when longer than a line."""
    printer = _FormulaPrinter()
    text = f"{printer.doprint(lhs)} = {printer.doprint(rhs)}"
    return "\n    ".join(
        textwrap.wrap(text, width=MAX_LINE - 8, subsequent_indent="    ", break_on_hyphens=False)
    )


@dataclass
class _Function:
    """What one generated function needs: its code and how to call it."""

    name: str
    source: str
    helpers: set[str] = field(default_factory=set)


def _wrap_call(prefix: str, call: str, args: list[str], indent: str = "") -> str:
    """``prefix + call(args)``, split one argument per line when it would be too long."""
    line = f"{indent}{prefix}{call}({', '.join(args)})"
    if len(line) + 4 <= MAX_LINE:  # the template indents the body by 4
        return line
    inner = indent + "    "
    body = "".join(f"{inner}{arg},\n" for arg in args)
    return f"{indent}{prefix}{call}(\n{body}{indent})"


class ModuleBuilder:
    """Collects the layer functions and the network's forward/backward lines."""

    def __init__(self, derivation: NetworkDerivation):
        self.derivation = derivation
        self.net = derivation.net
        self.env = environment()
        self.functions: dict[str, _Function] = {}
        self.helpers: set[str] = set()
        self.forward_lines: list[str] = []
        self.backward_lines: list[str] = []
        self.uses_rng = False
        self.uses_state = False

    # -- layer functions ----------------------------------------------------------------------
    def _render_function(self, name, signature, summary, formulas, assignments, returns):
        template = self.env.get_template("function.py.j2")
        return template.render(
            name=name,
            signature=signature,
            summary=summary,
            formulas=formulas,
            assignments=assignments,
            returns=returns,
        ).rstrip("\n")

    def _printed(self, outputs: list[tuple[str, sp.Expr]], form: Forward, available: list[str]):
        """Assignments for named outputs, repeated sub-expressions computed once, in order."""
        printer = SymbpNumPyPrinter()
        exprs = [float_constants(e) for _, e in outputs]
        replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("common"), order="none")
        # Trivial "common" values (1/N) read better inline.
        trivial = {s: v for s, v in replacements if sp.count_ops(v) <= 1 and not _has_array(v)}
        kept = [(s, v) for s, v in replacements if s not in trivial]
        renames = {s: sp.Symbol(f"common{i}") for i, (s, _) in enumerate(kept)}
        trivial = {s: v.xreplace(renames) for s, v in trivial.items()}
        renames.update(trivial)
        items = [(str(renames[s]), v.xreplace(renames)) for s, v in kept]
        items += [(t, v.xreplace(renames)) for (t, _), v in zip(outputs, reduced, strict=True)]
        ordered = _dependency_order(items, set(available))
        assignments = [(target, printer.doprint(value)) for target, value in ordered]
        self.helpers |= printer.helpers_used
        sizes = self._size_bindings([v for _, v in ordered], form, available)
        return sizes + assignments

    @staticmethod
    def _size_bindings(exprs, form: Forward, available: list[str]) -> list[tuple[str, str]]:
        """``N = x.shape[0]`` for each symbolic size the expressions use."""
        bindings = []
        free = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
        arrays = {a.name: a for a in form.arrays.values()}
        arrays.update({"d" + s.name: s.array for s in form.stages})
        for symbol in sorted(free, key=lambda s: s.name):
            if not (symbol.is_integer and symbol.is_positive):
                continue
            for name in available:
                array = arrays.get(name)
                if array is not None and symbol in array.dims:
                    bindings.append((symbol.name, f"{name}.shape[{array.dims.index(symbol)}]"))
                    break
        return bindings

    def layer_functions(self, stem: str, layer: Layer, derivation: LayerDerivation, eval_form):
        if f"{stem}_forward" in self.functions:
            return
        form = derivation.form
        names = set(form.arrays) | {derivation.upstream.name}
        lowering = Lowering(names)

        def keywords(exprs):
            used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
            names = [s.name for s in form.constants if s in used]
            return (", *, " + ", ".join(names)) if names else ""

        # forward
        outputs = [(s.name, lowering.lower(stabilize(s.expr), s.indices)) for s in form.stages]
        cached = [n for n in derivation.stored if n not in {p.name for p in form.params}]
        args = [a.name for a in form.inputs + form.params + form.aux]
        kw = keywords([e for _, e in outputs])
        returns = f"{form.output.name}, ({', '.join(cached)}{',' if len(cached) == 1 else ''})"
        if isinstance(layer, BatchNorm):
            returns += ", (mu, var)"
        self.functions[f"{stem}_forward"] = _Function(
            f"{stem}_forward",
            self._render_function(
                f"{stem}_forward",
                ", ".join(args) + kw,
                f"Forward pass of {layer.kind}; returns the output and what backward needs.",
                [formula(s.array[s.indices], s.expr) for s in form.stages],
                self._printed(outputs, form, args),
                returns,
            ),
        )

        # backward
        upstream = derivation.upstream.name
        params_read = [p.name for p in form.params if p.name in derivation.stored]
        grads = [(f"d{a.name}", derivation.vjp[a.name]) for a in form.differentiable]
        outputs = [(t, lowering.lower(stabilize(a.expr), a.indices)) for t, a in grads]
        kw = keywords([e for _, e in outputs])
        # A loss is the last node: its upstream gradient is 1 and not an argument.
        given = [upstream] if form.output.array.dims else []
        signature = ", ".join([*given, *cached, *params_read]) + kw
        assignments = self._printed(outputs, form, [*given, *cached, *params_read])
        if form.params:
            signature += (", " if kw else ", *, ") + "input_grad=True"
            for position, (target, code) in enumerate(assignments):
                if target in {f"d{a.name}" for a in form.inputs}:
                    assignments[position] = (target, f"{code} if input_grad else None")
        self.functions[f"{stem}_backward"] = _Function(
            f"{stem}_backward",
            self._render_function(
                f"{stem}_backward",
                signature,
                f"Backward pass of {layer.kind}, derived by symbp"
                + (f": gradients from {upstream}." if given else ": gradient of the loss."),
                [formula(a.lhs, a.expr) for _, a in grads],
                assignments,
                ", ".join(t for t, _ in grads),
            ),
        )

        # evaluation mode
        if eval_form is not None:
            low = Lowering(set(eval_form.arrays))
            stage = eval_form.output
            outputs = [(stage.name, low.lower(stabilize(stage.expr), stage.indices))]
            eval_constants = [s.name for s in eval_form.constants]
            args = [a.name for a in eval_form.inputs + eval_form.params + eval_form.aux]
            ekw = (", *, " + ", ".join(eval_constants)) if eval_constants else ""
            low.preferred = ()
            self.functions[f"{stem}_predict"] = _Function(
                f"{stem}_predict",
                self._render_function(
                    f"{stem}_predict",
                    ", ".join(args) + ekw,
                    f"Evaluation-mode forward pass of {layer.kind}.",
                    [formula(stage.array[stage.indices], stage.expr)],
                    self._printed(outputs, eval_form, args),
                    stage.name,
                ),
            )
        if isinstance(layer, BatchNorm):
            self._running_stats_function(layer)

    def _running_stats_function(self, layer: BatchNorm):
        updates = layer.state_updates()
        printer = SymbpNumPyPrinter()
        assignments = [(f"new_{k}", printer.doprint(v)) for k, v in updates.items()]
        self.functions["batchnorm_running_stats"] = _Function(
            "batchnorm_running_stats",
            self._render_function(
                "batchnorm_running_stats",
                "running_mean, running_var, mu, var, N, *, momentum",
                "Move the running statistics towards the batch's (unbiased variance).",
                [f"{k} <- {v}" for k, v in updates.items()],
                assignments,
                ", ".join(t for t, _ in assignments),
            ),
        )

    # -- network lines ------------------------------------------------------------------------
    def _constants(self, layer: Layer, form: Forward, exprs=None) -> list[str]:
        """Keyword arguments for the constants used (by ``exprs``, default: the forward)."""
        values = layer.constant_values()
        exprs = exprs if exprs is not None else [s.expr for s in form.stages]
        used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
        return [f"{s.name}={values[s.name]!r}" for s in form.constants if s in used]

    def place(self, items: list[Placed], indent: str = "") -> None:
        for item in items:
            self._place_one(item, indent)

    def _place_one(self, item: Placed, indent: str) -> None:
        layer = item.layer
        derivation = derive_cached(layer, item.in_shape)
        eval_form = layer.eval_form(item.in_shape)
        stem = layer.function_stem
        self.layer_functions(stem, layer, derivation, eval_form)
        form = derivation.form
        params = [f'params["{item.name}.{p.name}"]' for p in form.params]
        constants = self._constants(layer, form)
        key = f'cache["{item.name}"]'
        forward = self.forward_lines
        if layer.kind == "residual":
            skip = f"skip_{item.name}"
            forward.append(f"{indent}{skip} = h")
            self.place(item.body, indent)
            forward.append(f"{indent}h, {key} = {stem}_forward({skip}, h)")
            return
        if isinstance(layer, BatchNorm):
            self.uses_state = True
            state = [f'state["{item.name}.running_mean"]', f'state["{item.name}.running_var"]']
            momentum = f"momentum={layer.momentum!r}"
            forward.append(f"{indent}if train:")
            inner = indent + "    "
            forward.append(
                _wrap_call(
                    f"h, {key}, stats = ", f"{stem}_forward", ["h", *params, *constants], inner
                )
            )
            forward.append(f"{inner}if state is not None:")
            deeper = inner + "    "
            forward.append(f"{deeper}mean, var = {state[0]}, {state[1]}")
            forward.append(
                _wrap_call(
                    "mean[...], var[...] = ",
                    "batchnorm_running_stats",
                    ["mean", "var", "*stats", "h.shape[0]", momentum],
                    deeper,
                )
            )
            forward.append(f"{indent}else:")
            forward.append(
                _wrap_call("h = ", f"{stem}_predict", ["h", *params, *state, *constants], inner)
            )
            return
        if isinstance(layer, Rrelu):
            self.uses_rng = True
            inner = indent + "    "
            forward.append(f"{indent}if train:")
            forward.append(
                f"{inner}r = rng.uniform({layer.lower!r}, {layer.upper!r}, size=h.shape)"
                ".astype(h.dtype)"
            )
            forward.append(
                _wrap_call(f"h, {key} = ", f"{stem}_forward", ["h", "r", *constants], inner)
            )
            forward.append(f"{indent}else:")
            eval_constants = self._constants(layer, eval_form)
            forward.append(_wrap_call("h = ", f"{stem}_predict", ["h", *eval_constants], inner))
            return
        forward.append(
            _wrap_call(f"h, {key} = ", f"{stem}_forward", ["h", *params, *constants], indent)
        )

    def backward_for(self, items: list[Placed], guard_bottom: bool) -> None:
        """Backward lines for ``items`` in reverse; ``guard_bottom``: the input grad is optional."""
        for position in range(len(items) - 1, -1, -1):
            item = items[position]
            layer = item.layer
            below_has_params = any(p.param_shapes or p.body for p in items[:position])
            optional = guard_bottom and not below_has_params
            derivation = derive_cached(layer, item.in_shape)
            self._backward_one(item, derivation, optional)

    def _backward_one(self, item: Placed, derivation: LayerDerivation, optional: bool) -> None:
        layer, stem = item.layer, item.layer.function_stem
        form = derivation.form
        lines = self.backward_lines
        if layer.kind == "residual":
            skip = f"dskip_{item.name}"
            lines.append(f"{skip}, dh = {stem}_backward(dh)")
            self.backward_for(item.body, guard_bottom=False)
            lines.append(f"dh = {skip} + dh")
            return
        params_read = [
            f'params["{item.name}.{p.name}"]' for p in form.params if p.name in derivation.stored
        ]
        constants = self._constants(layer, form, [a.expr for a in derivation.vjp.values()])
        args = ["dh", f'*cache["{item.name}"]', *params_read, *constants]
        targets = ["dh"] + [f'grads["{item.name}.{p.name}"]' for p in form.params]
        if form.params and optional:
            args.append("input_grad=wrt_input")
        call = _wrap_call(f"{', '.join(targets)} = ", f"{stem}_backward", args)
        if not form.params and optional:
            lines.append("if wrt_input:")
            call = "\n".join("    " + line for line in call.splitlines())
        lines.append(call)

    # -- inits --------------------------------------------------------------------------------
    def inits(self) -> list[dict]:
        result = []

        def visit(items: list[Placed]):
            for position, item in enumerate(items):
                if item.body:
                    visit(item.body)
                for param, shape in item.layer.param_shapes(item.in_shape).items():
                    key = f"{item.name}.{param}"
                    rule = item.layer.init.get(param, "zeros")
                    if rule == "fan":
                        fan_in, fan_out = shape[0], shape[-1]
                        relu_next = _next_activation(items, position) in RELU_LIKE
                        std = (
                            math.sqrt(2 / fan_in)
                            if relu_next
                            else math.sqrt(2 / (fan_in + fan_out))
                        )
                        result.append(
                            dict(key=key, kind="normal", std=repr(std), shape=tuple(shape))
                        )
                    else:
                        value = {"zeros": 0.0, "ones": 1.0}.get(rule, rule)
                        result.append(
                            dict(key=key, kind="full", value=repr(float(value)), shape=tuple(shape))
                        )

        visit(self.net.placed)
        return result


def _has_array(expr: sp.Expr) -> bool:
    return any(not (s.is_integer and s.is_positive) for s in expr.free_symbols)


def _dependency_order(items, defined: set[str]):
    """Assignments in their given order, except that each comes after what it reads."""
    pending = list(items)
    targets = {t for t, _ in items}
    done = set(defined)
    ordered = []
    while pending:
        for position, (target, value) in enumerate(pending):
            needs = {s.name for s in value.free_symbols} & targets
            if needs <= done:
                ordered.append((target, value))
                done.add(target)
                del pending[position]
                break
        else:
            raise ValueError(f"circular assignments: {[t for t, _ in pending]}")
    return ordered


def _next_activation(items: list[Placed], position: int) -> str | None:
    """The kind of the first element-wise layer after ``position`` (skipping batch norm)."""
    for item in items[position + 1 :]:
        if isinstance(item.layer, BatchNorm):
            continue
        return item.layer.kind if isinstance(item.layer, Elementwise) else None
    return None


def generate_module(net: Net, derivation: NetworkDerivation | None = None) -> str:
    """The source of the generated module (deterministic: same net, same bytes)."""
    derivation = derivation or derive_network(net)
    builder = ModuleBuilder(derivation)
    builder.place(net.placed)
    builder.backward_for(net.placed, guard_bottom=True)
    loss = None
    if net.loss is not None:
        loss_derivation = derivation.loss
        assert loss_derivation is not None
        stem = net.loss.function_stem
        builder.layer_functions(stem, net.loss, loss_derivation, None)
        target = (
            "np.eye(out.shape[1], dtype=out.dtype)[y]" if net.loss.target_kind == "labels" else "y"
        )
        loss = dict(
            kind=net.loss.kind,
            forward=f"{stem}_forward",
            backward=f"{stem}_backward",
            target=target,
        )
    summary = [f"{item.name}: {item.layer.describe()}" for item in net.walk()]
    if net.loss is not None:
        summary.append(f"loss: {net.loss.kind}")
    template = builder.env.get_template("module.py.j2")
    source = template.render(
        net=net,
        version=__version__,
        summary=summary,
        imports=sorted({"math"} if builder.helpers else set()),
        param_shapes={k: tuple(v) for k, v in net.param_shapes.items()},
        state_shapes={k: tuple(v) for k, v in net.state_shapes.items()},
        helpers=[_helper_source(builder.env, name) for name in sorted(builder.helpers)],
        inits=builder.inits(),
        functions=[f.source for f in builder.functions.values()],
        uses_rng=builder.uses_rng,
        uses_state=builder.uses_state,
        forward_lines=[line for block in builder.forward_lines for line in block.splitlines()],
        backward_lines=[line for block in builder.backward_lines for line in block.splitlines()],
        loss=loss,
    )
    return source


def _helper_source(env: jinja2.Environment, name: str) -> str:
    return env.get_template("helpers.py.j2").module.__getattribute__(name)().rstrip("\n")
