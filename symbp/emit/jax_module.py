"""Generate a JAX module for a network: the same plan, printed for ``jax.numpy``.

Each distinct layer math gets the layer functions the NumPy module has (the same derivation,
lowered to the same whole-array expressions, printed by :class:`SymbpJaxPrinter`, nothing in
place) and one ``jax.custom_vjp`` function calling them: its forward rule returns as residuals
what the derivation keeps (the plan's ``kept``) and the parameters the backward reads, its
backward rule is the derived backward. The network is a pair of pure functions, ``init`` and
``apply(params, state, x, train=...)``, which run the plan's forward steps; JAX chains the
layers' backward rules (a value read twice gets the sum of its parts). Structure comes from
``templates/jax_module.py.j2``; nothing here tests a layer's type: what differs between layers
is read off the plan and the layer's declaration.
"""

from __future__ import annotations

import importlib.util

from ..declare.net import Net
from ..derivation.network import NetworkDerivation, derive_network
from ..derivation.plan import Plan, build_plan
from ..errors import SpecError
from ..naming import adjoint, backward_function, forward_function, predict_function
from ..version import __version__
from .graph_vars import chained_rows, template_inputs, variables
from .jax_printer import JaxPrintError, SymbpJaxPrinter, helper_sources
from .layout import MAX_LINE
from .module import ModuleBuilder
from .network import _message_parts, inits, size_values
from .objective import regularizer_context

#: How the JAX module draws what ``numpy.random.Generator.<method>(*args)`` draws, shaped as
#: the layer's input ``h``, from the key ``key``: a table of distributions, not of layers.
DRAWS = {
    "uniform": "jax.random.uniform(key, h.shape, h.dtype, {0!r}, {1!r})",
    "binomial": "jax.random.bernoulli(key, {1!r}, h.shape).astype(h.dtype)",
}

#: Names of the generated module that a layer function's stem must not take.
_RESERVED = {"apply", "init", "init_numpy", "init_state", "loss", "jax", "jnp", "np",
             "functools", "regularizer", "weight_decay"}


class JaxBuilder(ModuleBuilder):
    """The NumPy builder's layer functions, printed for JAX (no ``out=``: new arrays)."""

    printer_class = SymbpJaxPrinter
    reuses_memory = False
    unrolled_template = "jax_unrolled.py.j2"
    unrolled_loop = " in jax.lax.scan"
    array_module = "jnp"

    def _printed(self, *args, **kwargs):
        # a long value in parentheses, which the line wrapping breaks between its terms (the
        # NumPy module's in-place calls break at their arguments)
        statements = super()._printed(*args, **kwargs)
        for st in statements:
            if len(st.target) + len(st.code) + 11 > MAX_LINE and st.call is None:
                st.code = f"({st.code})"
        return statements


def _pairs(values: dict) -> str:
    """A dict of constants as a hashable tuple of pairs (a ``nondiff_argnums`` argument)."""
    pairs = [f'("{k}", {v!r})' for k, v in values.items()]
    return "(" + ", ".join(pairs) + ("," if len(pairs) == 1 else "") + ")"


def _rule(builder: JaxBuilder, stem: str, derivation, stats=()) -> dict:
    """What the template needs to print the ``jax.custom_vjp`` function of one layer math."""
    form = derivation.form
    args = [a.name for a in form.inputs + form.params + form.aux]
    differentiable = {a.name for a in form.differentiable}
    name = stem if stem not in _RESERVED else f"{stem}_layer"
    return dict(
        name=name,
        stem=stem,
        args=args,
        forward=builder.forward_names.get(stem, forward_function(stem)),
        backward=backward_function(stem),
        kept=[array.name for array in derivation.cached],
        params_read=[p.name for p in derivation.params_read],
        grads=[adjoint(a.name) for a in form.differentiable],
        returns=[adjoint(a) if a in differentiable else "None" for a in args],
        stats=list(stats),
        output=form.output.name,
        upstream=derivation.upstream.name,
        given=bool(form.output.array.dims),  # a loss's upstream gradient is the cotangent
    )


def _forward_rows(builder: JaxBuilder, plan: Plan, rules: dict) -> list[dict]:
    rows = []
    for step, inputs, row in chained_rows(plan):
        if row["reshape"]:
            rows.append(row)
            continue
        stem = builder.stems[step.name] + step.stem_suffix
        try:
            builder.layer_functions(stem, step.layer, step.derivation, step.eval_form)
        except JaxPrintError as err:
            raise SpecError(f"{err}", layer=step.name) from None
        if stem not in rules:
            rules[stem] = _rule(builder, stem, step.derivation, step.layer.train_returns)
        rule = rules[stem]
        form = step.derivation.form
        sizes = size_values(step, form)
        forward_kw = dict(step.constants())
        forward_kw.update({k: sizes[k] for k in builder.size_keywords.get(rule["forward"], [])})
        backward_kw = dict(step.backward_constants())
        backward_kw.update({k: sizes[k] for k in builder.size_keywords.get(rule["backward"], [])})
        draws = [
            dict(name=name, code=DRAWS[method].format(*args))
            for name, (method, args) in step.draws.items()
        ]
        call_args = [_pairs(forward_kw), _pairs(backward_kw), *inputs]
        call_args += [f'params["{key}"]' for key in step.params] + [d["name"] for d in draws]
        row.update(call=f"{rule['name']}({', '.join(call_args)})", stats=bool(rule["stats"]),
                   draws=draws)
        if step.eval_form is not None:
            row.update(modes=True, too_few=None, state_update=None)
            eval_form = step.eval_form
            state = {k.rsplit(".", 1)[1]: k for k in step.state}
            eval_args = [inputs[0]]
            eval_args += [f'params["{step.name}.{p.name}"]' for p in eval_form.params]
            eval_args += [f'state["{state[a.name]}"]' for a in eval_form.aux if a.name in state]
            eval_args += [f"{k}={v!r}" for k, v in step.eval_constants().items()]
            row["predict"] = f"{predict_function(stem)}({', '.join(eval_args)})"
            axes = step.layer.statistics_over(step.placed.in_shape)
            count = " * ".join(f"h.shape[{a}]" for a in axes) or "1"
            if step.layer.min_values_per_statistic > 1:
                row["too_few"] = dict(
                    count=count,
                    minimum=step.layer.min_values_per_statistic,
                    message=_message_parts(
                        f"{step.name}: {step.layer.too_few_values} ({{{count}}} values)"
                    ),
                )
            if step.state:
                update = builder.state_update_function(stem, step.layer)
                used = {s.name for e in step.layer.state_updates().values()
                        for s in e.free_symbols}
                values = step.layer.constant_values()
                row["state_update"] = dict(
                    targets=", ".join(f'new_state["{k}"]' for k in step.state),
                    call=f"{update}("
                    + ", ".join([*(f'state["{k}"]' for k in step.state), "*stats", count]
                                + [f"{k}={v!r}" for k, v in values.items() if k in used])
                    + ")",
                )
        rows.append(row)
    return rows


def _loss(builder: JaxBuilder, net: Net, derivation: NetworkDerivation, rules: dict):
    """The loss's ``custom_vjp`` function and how ``loss`` calls it (None: no loss)."""
    if net.loss is None:
        return None
    stem = builder.stems[None]
    builder.layer_functions(stem, net.loss, derivation.loss, None)
    rules[stem] = rule = _rule(builder, stem, derivation.loss)
    labels = net.loss.target_kind == "labels"
    return dict(
        kind=net.loss.kind,
        call=rule["name"],
        classes=net.output_shape[0] if labels else None,
    )


def _decay(builder: JaxBuilder, derivation: NetworkDerivation, rules: dict):
    """Weight decay's terms as ``custom_vjp`` functions (None: no weight decay)."""
    context = regularizer_context(builder, derivation)
    if context is None:
        return None
    terms = []
    for term, (key, forward, _) in zip(derivation.decay, context["terms"], strict=True):
        stem = forward[: -len("_forward")]
        if stem not in rules:
            rules[stem] = _rule(builder, stem, term.derivation)
        terms.append(dict(key=key, call=rules[stem]["name"]))
    return dict(value=context["value"], params=context["params"], terms=terms)


def generate_jax_module(net: Net, derivation: NetworkDerivation | None = None) -> str:
    """The source of the generated JAX module (deterministic: same net, same bytes).

    Without JAX installed, a :class:`SpecError` saying what to install."""
    if importlib.util.find_spec("jax") is None:
        raise SpecError("the jax target needs JAX: pip install 'symbp[jax]'")
    derivation = derivation or derive_network(net)
    builder = JaxBuilder(derivation)
    plan = build_plan(net, derivation)
    rules: dict[str, dict] = {}
    rows = _forward_rows(builder, plan, rules)
    try:
        loss = _loss(builder, net, derivation, rules)
        decay = _decay(builder, derivation, rules)
    except JaxPrintError as err:
        raise SpecError(f"{err}", field="loss") from None
    summary = [f"{item.name}: {item.layer.describe()}" for item in derivation.layers]
    state_initial = [
        (key, repr(float(step.layer.state_initial[key.rsplit(".", 1)[1]])))
        for step in plan.forward
        for key in step.state
    ]
    initials = inits(plan)
    normal = [init for init in initials if init["kind"] == "normal"]
    for index, init in enumerate(normal):
        init["index"] = index
    template = builder.env.get_template("jax_module.py.j2")
    return template.render(
        net=net,
        version=__version__,
        summary=summary,
        loss=loss,
        decay=decay,
        param_shapes={k: tuple(v) for k, v in net.param_shapes.items()},
        state_shapes={k: tuple(v) for k, v in net.state_shapes.items()},
        input_shape=tuple(net.input_shape),
        output_shape=tuple(net.output_shape),
        helpers=helper_sources(builder.helpers),
        inits=initials,
        normal_count=len(normal),
        state_initial=state_initial,
        layer_functions=[f.source for f in builder.functions.values()],
        rules=list(rules.values()),
        steps=rows,
        uses_rng=any(row.get("draws") for row in rows),
        **template_inputs(plan, variables(plan)),  # one x, or several named inputs
    )

