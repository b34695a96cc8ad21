"""Generate a PyTorch module for a network: the same plan, printed for torch.

Each distinct layer math gets the layer functions the NumPy module has (the same derivation,
lowered to the same whole-array expressions, printed by :class:`SymbpTorchPrinter`) and one
``torch.autograd.Function`` calling them: its ``forward`` saves for backward what the
derivation keeps (the plan's ``kept``) and the parameters the backward reads, less what costs
more memory than computing it again (:func:`without_carried`, :func:`_saving`), its
``backward`` is the derived one. The network is an ``nn.Module`` whose forward runs the
plan's forward steps; autograd chains the layers' backward passes (a value read twice gets
the sum of its parts). Structure comes from ``templates/torch_module.py.j2``; nothing here
tests a layer's type: what differs between layers is read off the plan and the layer's declaration.
"""

from __future__ import annotations

import dataclasses
from math import prod

import sympy as sp

from ..declare.net import Net
from ..derivation.arrays import Lowering
from ..derivation.network import NetworkDerivation, derive_network
from ..derivation.plan import Plan, Step, build_plan
from ..derivation.stable import softmax_of_stages, stabilize
from ..errors import SpecError
from ..naming import adjoint, backward_function, forward_function, predict_function
from ..version import __version__
from .graph_vars import chained_rows
from .layout import MAX_LINE, formula
from .module import ModuleBuilder, _Function, _live
from .network import inits, size_values
from .objective import regularizer_context
from .torch_helpers import HELPER_SOURCES, helper_closure
from .torch_printer import SymbpTorchPrinter, TorchPrintError

#: How the torch module draws what ``numpy.random.Generator.<method>(*args)`` draws, shaped
#: as the layer's input ``h``: a table of distributions, not of layers.
DRAWS = {
    "uniform": "torch.empty_like(h).uniform_({0!r}, {1!r}, generator=self.generator)",
    # one trial (a dropout mask): booleans, one byte an element where backward keeps them
    "binomial": "torch.bernoulli(torch.full_like(h, {1!r}), generator=self.generator).bool()",
}


class TorchBuilder(ModuleBuilder):
    """The NumPy builder's layer functions, printed for torch (no ``out=``: new tensors)."""

    printer_class = SymbpTorchPrinter
    unrolled_template = "torch_unrolled.py.j2"
    array_module = "torch"

    def _printed(self, outputs, form, available, returned=None, writable=None, into=(),
                 carried=()):
        # Temporaries lend their memory to later passes as in NumPy's module (``out=``, in-place
        # chains); never an argument (autograd may hand one tensor to several backward
        # functions) nor a caller's array for a gradient.
        # A long value in parentheses: the line breaks at its top-level terms (NumPy's module
        # breaks inside its helpers' calls, which torch's code does not have).
        statements = super()._printed(outputs, form, available, returned, None, frozenset(),
                                      carried)
        for st in statements:
            long = len(f"{st.target} = {st.code} if input_grad else None") + 8 > MAX_LINE
            if long and st.call is None and not st.code.startswith("("):
                st.code = f"({st.code})"
        return statements

    @staticmethod
    def _stage_values(derivation) -> list[tuple[str, sp.Expr]]:
        """The forward's stages as whole-array values, in order (as the forward computes
        them, reading the carried values it keeps)."""
        form = derivation.form
        lowering = Lowering(set(form.arrays) | {derivation.upstream.name}, form)
        kept = {c.expr: c.array[c.indices] for c in derivation.carried}
        return [
            (s.name, lowering.lower(
                softmax_of_stages(stabilize(s.expr).xreplace(kept), form.stages), s.indices))
            for s in form.stages
        ]

    def stage_reads(self, derivation, name: str, available: set[str]) -> set[str] | None:
        """The arrays computing the forward's stage ``name`` again reads, stopping at the
        arrays ``available`` (None: ``name`` is not a stage of the forward)."""
        values = [(t, v) for t, v in self._stage_values(derivation) if t not in available]
        if name not in {t for t, _ in values}:
            return None
        live = _live(values, {name})
        arrays = set(derivation.form.arrays) | {c.name for c in derivation.carried}
        read = {s.name for _, v in live for s in v.free_symbols} & arrays
        return read - {t for t, _ in live}

    def recompute_function(self, stem: str, derivation, names: list[str],
                           available: list[str]) -> tuple[str, list[str]]:
        """``<stem>_recompute``: the forward's stages ``names`` computed again from the arrays
        ``available`` (what the torch target saves in their place), printed like the forward;
        its name and its keyword arguments."""
        name = f"{stem}_recompute"
        form = derivation.form
        values = [(t, v) for t, v in self._stage_values(derivation) if t not in available]
        outputs = _live(values, set(names))
        read = {s.name for _, v in outputs for s in v.free_symbols}
        args = [a for a in available if a in read]
        statements = self._printed(outputs, form, args)
        constants = [s.name for s in form.constants if s.name in read]
        keywords = [*constants, *self.unbound]
        signature = ", ".join(args) + (", *, " + ", ".join(keywords) if keywords else "")
        # the stages' definitions from the kept arrays to those computed again (a softmax's
        # lse among them, though its code computes the shifted exponentials instead)
        needed, shown = set(names), []
        for stage in reversed(form.stages):
            if stage.name in needed and stage.name not in available:
                shown.append(stage)
                needed |= {e.base.name for e in stage.expr.atoms(sp.Indexed)}
        self.functions[name] = _Function(name, self._render_function(
            name,
            signature,
            f"{', '.join(names)} of {forward_function(stem)} again, for the backward pass.",
            [formula(s.array[s.indices], s.expr) for s in reversed(shown)],
            statements,
            ", ".join(names),
        ))
        return name, args, keywords


def camel(name: str) -> str:
    """``mlp_bn`` -> ``MlpBn``: the class name of a network's module."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Net"


def _keywords(values: dict) -> str:
    return "{" + ", ".join(f'"{k}": {v!r}' for k, v in values.items()) + "}"


def _attribute(key: str) -> str:
    """``fc1.W`` -> ``self.fc1.W`` (a submodule per layer: its state_dict key is ``fc1.W``)."""
    return f"self.{key}"


def without_carried(step: Step) -> Step:
    """``step`` with an element-wise layer's carried function values (GELU's
    ``erf(x/sqrt(2))``, mish's ``tanh(softplus(x))``) computed again by the derived backward
    from the input it keeps, not saved: what PyTorch's own activations and the
    memory-efficient activation Functions people write save (the input alone). A kept step
    (ReLU's bool ``y > 0``) stays."""
    derivation = step.derivation
    carried = derivation.carried
    if not derivation.form.elementwise or not carried or any(c.dtype for c in carried):
        return step
    return dataclasses.replace(
        step, derivation=dataclasses.replace(derivation, carried=(), code_reads=None))


def _elements(step: Step):
    """The number of elements of one of ``step``'s arrays at the net's sizes, a batch of one
    (the batch size, not a per-sample size, is the one size left as a symbol)."""
    form = step.derivation.form
    values = {**size_values(step, form), **step.layer.constant_values()}

    def count(name: str) -> int:
        dims = [sp.sympify(d) for d in form.arrays[name].dims]
        dims = [d.subs({s: values[s.name] for s in d.free_symbols if s.name in values})
                for d in dims]
        return int(prod(d if d.is_number else 1 for d in dims))

    return count


def _saving(builder: TorchBuilder, stem: str, step: Step) -> dict:
    """What the ``autograd.Function`` saves for backward and what its backward computes
    again, from the step's kept arrays (``step.kept``): a kept stage of the forward is computed
    again in backward, not saved, where the arrays it is computed from are each smaller than
    it and those not saved anyway are together smaller too (a padded convolution's ``xp``:
    the input saved, padded again; attention's ``p`` (T x T a head) from the ``q`` and ``k``
    it keeps anyway). The derived backward reads the same arrays either way."""
    derivation = step.derivation
    form = derivation.form
    kept = list(step.kept)
    params = [p.name for p in form.params]
    params_read = [p.name for p in derivation.params_read]
    inputs = [a.name for a in form.inputs]
    stages = {s.name for s in form.stages} - {form.output.name}
    count = _elements(step)
    saved = list(kept)
    recomputed: list[str] = []
    for name in [k for k in kept if k in stages]:
        others = [k for k in saved if k != name]
        reads = builder.stage_reads(derivation, name, set(others) | set(params) | set(inputs))
        if reads is None or reads - set(others) - set(params) - set(inputs):
            continue
        new = [a for a in inputs if a in reads and a not in others]
        arrays = (reads - set(params)) | set(new)
        if all(count(a) < count(name) for a in arrays) and sum(map(count, new)) < count(name):
            recomputed.append(name)
            saved = [*others, *new]
    read_params = list(params_read)
    function = None
    if recomputed:
        available = [*saved, *params]
        function, args, keywords = builder.recompute_function(stem, derivation, recomputed,
                                                              available)
        forward_keywords = set(step.constants()) | set(
            builder.size_keywords.get(builder.forward_names[stem], []))
        if set(keywords) - forward_keywords:  # a size only the recomputation needs: save
            builder.functions.pop(function)
            return dict(saved=kept, params_saved=params_read, recompute=None)
        read_params += [p for p in params if p in args and p not in read_params]
        names = ["_" if k in recomputed else k for k in kept]
        unpacked = f"({', '.join(names)}{',' if len(names) == 1 else ''})"
        call = ", ".join([*args, *(f'{k}=ctx.keywords["{k}"]' for k in keywords)])
        function = dict(name=function, names=recomputed, keywords=keywords, unpacked=unpacked,
                        call=f"{', '.join(recomputed)} = {function}({call})")
    return dict(saved=saved, params_saved=read_params, recompute=function)


def _function_class(builder: TorchBuilder, stem: str, step: Step) -> dict:
    """What the template needs to print the ``autograd.Function`` of one layer math."""
    form = step.derivation.form
    args = [a.name for a in form.inputs + form.params + form.aux]
    differentiable = {a.name for a in form.differentiable}
    grads = [adjoint(a.name) for a in form.differentiable]
    input_grad = bool(form.params) and form.differentiable != form.params
    stats = list(step.layer.train_returns)
    return dict(
        name=camel(stem) + "Function",
        stem=stem,
        args=args,
        forward=builder.forward_names[stem],
        backward=backward_function(stem),
        kept=step.kept,
        params_read=[p.name for p in step.derivation.params_read],
        grads=grads,
        returns=[adjoint(a) if a in differentiable else "None" for a in args],
        input_grad=input_grad,
        stats=stats,
        output=form.output.name,
        **_saving(builder, stem, step),
    )


def _forward_rows(builder: TorchBuilder, plan: Plan, functions: dict) -> list[dict]:
    rows = []
    for step, inputs, row in chained_rows(plan):
        if row["reshape"]:
            rows.append(row)
            continue
        step = without_carried(step)
        stem = builder.stems[step.name] + step.stem_suffix
        try:
            builder.layer_functions(stem, step.layer, step.derivation, step.eval_form)
        except TorchPrintError as err:
            raise SpecError(f"{err}", layer=step.name) from None
        if stem not in functions:
            functions[stem] = _function_class(builder, stem, step)
        function = functions[stem]
        form = step.derivation.form
        sizes = size_values(step, form)
        forward_kw = dict(step.constants())
        forward_kw.update({k: sizes[k] for k in builder.size_keywords.get(function["forward"], [])})
        backward_kw = dict(step.backward_constants())
        backward_kw.update(
            {k: sizes[k] for k in builder.size_keywords.get(function["backward"], [])}
        )
        if any(method not in DRAWS or (method == "binomial" and args[0] != 1)
               for method, args in step.draws.values()):
            raise SpecError("the torch target cannot draw its random values yet", layer=step.name)
        draws = [
            dict(name=name, code=DRAWS[method].format(*args))
            for name, (method, args) in step.draws.items()
        ]
        call_args = [*inputs, *map(_attribute, step.params), *[d["name"] for d in draws]]
        call = (
            f"{function['name']}.apply({', '.join(call_args)}, "
            f"{_keywords(forward_kw)}, {_keywords(backward_kw)})"
        )
        row.update(call=call, stats=bool(function["stats"]), draws=draws)
        if step.eval_form is not None:
            row.update(modes=True, too_few=None, state_update=None)
            eval_form = step.eval_form
            state = {k.rsplit(".", 1)[1]: k for k in step.state}
            eval_args = [inputs[0]]
            eval_args += [_attribute(f"{step.name}.{p.name}") for p in eval_form.params]
            eval_args += [_attribute(state[a.name]) for a in eval_form.aux if a.name in state]
            eval_args += [f"{k}={v!r}" for k, v in step.eval_constants().items()]
            row["predict"] = f"{predict_function(stem)}({', '.join(eval_args)})"
            axes = step.layer.statistics_over(step.placed.in_shape)
            count = " * ".join(f"h.shape[{a}]" for a in axes) or "1"
            if step.layer.min_values_per_statistic > 1:
                row["too_few"] = dict(
                    count=count,
                    minimum=step.layer.min_values_per_statistic,
                    message=f"{step.name}: {step.layer.too_few_values}",
                )
            if step.state:
                update = builder.state_update_function(stem, step.layer)
                used = {s.name for e in step.layer.state_updates().values()
                        for s in e.free_symbols}
                values = step.layer.constant_values()
                row["state_update"] = dict(
                    state=[_attribute(k) for k in step.state],
                    call=f"{update}("
                    + ", ".join([*map(_attribute, step.state), "*stats", count]
                                + [f"{k}={v!r}" for k, v in values.items() if k in used])
                    + ")",
                )
        rows.append(row)
    return rows


def _modules(plan: Plan, net: Net) -> list[dict]:
    """One ``_Params`` submodule per layer with parameters or state: its names and shapes."""
    rows = []
    params = {k: tuple(v) for k, v in net.param_shapes.items()}
    state = {k: tuple(v) for k, v in net.state_shapes.items()}
    for step in plan.forward:
        mine = [k for k in params if k.rsplit(".", 1)[0] == step.name]
        buffers = [
            dict(name=k.rsplit(".", 1)[1], shape=state[k],
                 value=repr(float(step.layer.state_initial[k.rsplit(".", 1)[1]])))
            for k in state if k.rsplit(".", 1)[0] == step.name
        ]
        if mine or buffers:
            rows.append(dict(name=step.name, params=[k.rsplit(".", 1)[1] for k in mine],
                             buffers=buffers))
    return rows


def generate_torch_module(net: Net, derivation: NetworkDerivation | None = None) -> str:
    """The source of the generated PyTorch module (deterministic: same net, same bytes)."""
    derivation = derivation or derive_network(net)
    builder = TorchBuilder(derivation)
    plan = build_plan(net, derivation)
    functions: dict[str, dict] = {}
    rows = _forward_rows(builder, plan, functions)
    decay = regularizer_context(builder, derivation)
    builder.helpers.discard("_add_blocks")  # autograd adds the term's gradient
    if decay is not None:  # an autograd.Function per distinct term (one per weight rank)
        decay["classes"] = {f: (camel(f.removesuffix("_forward")) + "Function", b)
                            for _, f, b in decay["terms"]}
        decay["terms"] = [(_attribute(k), decay["classes"][f][0]) for k, f, _ in decay["terms"]]
    summary = [f"{item.name}: {item.layer.describe()}" for item in derivation.layers]
    template = builder.env.get_template("torch_module.py.j2")
    return template.render(
        net=net,
        class_name=camel(net.name),
        version=__version__,
        summary=summary,
        loss=net.loss.kind if net.loss is not None else None,
        param_shapes={k: tuple(v) for k, v in net.param_shapes.items()},
        state_shapes={k: tuple(v) for k, v in net.state_shapes.items()},
        input_shape=tuple(net.input_shape),
        helpers=[HELPER_SOURCES[h] for h in helper_closure(builder.helpers)],
        inits=inits(plan),
        layer_functions=[f.source for f in builder.functions.values()],
        classes=list(functions.values()),
        modules=_modules(plan, net),
        steps=rows,
        uses_rng=any(row.get("draws") for row in rows),
        decay=decay,
        inputs=list(plan.inputs),
    )


def require_torch() -> None:
    """A one-line error saying what to install, where PyTorch is missing."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SpecError("the torch target needs PyTorch: pip install 'symbp[torch]'")


def generate_torch_activation(expr: str) -> str:
    """A stand-alone module for one activation given as an expression in x: its
    ``autograd.Function`` (saving what the derivation keeps) and an ``nn.Module`` around it,
    for inputs of any shape (the activation is element-wise)."""
    from ..declare.activations import Activation

    layer = Activation(expr)
    net = Net([layer], input_features=1, name="activation")
    return generate_torch_module(net)
