"""Generate a PyTorch module for a network: the same plan, printed for torch.

Each distinct layer math gets the layer functions the NumPy module has (the same derivation,
lowered to the same whole-array expressions, printed by :class:`SymbpTorchPrinter`) and one
``torch.autograd.Function`` calling them: its ``forward`` saves for backward what the
derivation keeps (the plan's ``kept``) and the parameters the backward reads, its ``backward``
is the derived one. The network is an ``nn.Module`` whose forward runs the plan's forward
steps; autograd chains the layers' backward passes (a value read twice gets the sum of its
parts). Structure comes from ``templates/torch_module.py.j2``; nothing here tests a layer's
type: what differs between layers is read off the plan and the layer's declaration.
"""

from __future__ import annotations

from ..declare.net import Net
from ..derivation.network import NetworkDerivation, derive_network, refuse_unrolled
from ..derivation.plan import Plan, Step, build_plan
from ..errors import SpecError
from ..naming import adjoint, backward_function, predict_function
from ..version import __version__
from .graph_vars import chained_rows
from .layout import MAX_LINE
from .module import ModuleBuilder
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


def camel(name: str) -> str:
    """``mlp_bn`` -> ``MlpBn``: the class name of a network's module."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Net"


def _keywords(values: dict) -> str:
    return "{" + ", ".join(f'"{k}": {v!r}' for k, v in values.items()) + "}"


def _attribute(key: str) -> str:
    """``fc1.W`` -> ``self.fc1.W`` (a submodule per layer: its state_dict key is ``fc1.W``)."""
    return f"self.{key}"


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
    )


def _forward_rows(builder: TorchBuilder, plan: Plan, functions: dict) -> list[dict]:
    rows = []
    for step, inputs, row in chained_rows(plan):
        if row["reshape"]:
            rows.append(row)
            continue
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
    refuse_unrolled(derivation, "the torch target")
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
