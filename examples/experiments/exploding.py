"""Experiment 3: exploding gradients -- the same deep MLP with its weights scaled up.

The 12-hidden-layer, width-32 MLP of experiment 2, every weight matrix multiplied by a factor
after symbp's initialization (He for ReLU, Glorot for tanh). First, at initialization on a batch
of two-spiral points, the norm of the gradient of every linear layer's weights, from the input
side to the output (ReLU at scales 0.5..2, tanh at 1..4, ReLU + batch norm at 1 and 4), with
the bound symbp proves on ``||d out / d input||`` at those weights. Then plain SGD (as in
experiment 2) on the ReLU network at scales 1, 1.5 and 2, and ReLU + batch norm at scale 2;
loss per epoch, stopping at the first non-finite loss.

    python examples/experiments/exploding.py --out results/exploding [--quick]

Writes ``exploding.png``, ``exploding_profiles.csv`` (one row per network, scale and layer),
``exploding_training.csv`` (one row per run and epoch) and ``exploding.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common import compile_net, figure, mlp, sgd, two_spirals, write_csv, write_json

from symbp.derivation.network import derive_network
from symbp.flow.chain import flow_bounds
from symbp.flow.numeric import measure

PROFILES = {
    "relu": (dict(activation="relu"), [0.5, 1.0, 1.5, 2.0]),
    "tanh": (dict(activation="tanh"), [1.0, 2.0, 4.0]),
    "relu + batchnorm": (dict(activation="relu", batchnorm=True), [1.0, 4.0]),
}
TRAINING = [
    ("relu", dict(activation="relu"), 1.0),
    ("relu", dict(activation="relu"), 1.5),
    ("relu", dict(activation="relu"), 2.0),
    ("relu + batchnorm", dict(activation="relu", batchnorm=True), 2.0),
]
FULL = dict(depth=12, batch=128, train=2000, epochs=30, sgd_batch=64, lr=0.05)
#: losses above this are drawn on it in the figure
CEILING = 10.0
QUICK = dict(depth=4, batch=64, train=256, epochs=2, sgd_batch=64, lr=0.05)


def scaled(params: dict, scale: float) -> dict:
    """Every weight matrix times ``scale``; biases, gammas and betas unchanged."""
    return {k: v * scale if k.endswith(".W") else v.copy() for k, v in params.items()}


def run(out: Path, *, quick: bool) -> dict:
    settings = QUICK if quick else FULL
    data = two_spirals(settings["batch"], seed=100)
    profiles = []
    for label, (options, scales) in PROFILES.items():
        net = mlp(settings["depth"], **options)
        module = compile_net(net)
        bounds = flow_bounds(derive_network(net))
        initial = module.init_params(seed=0)
        weights = [key for key in net.param_shapes if key.endswith(".W")]
        for scale in scales:
            measured = measure(
                net,
                bounds,
                module=module,
                params=scaled(initial, scale),
                inputs=data,
                jacobian_batch=0,
            )
            by_layer = {row.layer: row for row in measured.rows}
            for position, key in enumerate(weights, start=1):
                row = by_layer[key.rsplit(".", 1)[0]]
                profiles.append(
                    {
                        "network": label,
                        "scale": scale,
                        "layer": position,
                        "weight_grad": row.param_grads[key],
                        "bound_chain": row.product * measured.dout,
                        "loss": measured.loss,
                    }
                )
    data = two_spirals(settings["train"], seed=0)
    training, final = [], {}
    for label, options, scale in TRAINING:
        net = mlp(settings["depth"], **options)
        module = compile_net(net)
        params = scaled(module.init_params(seed=0), scale)
        history = sgd(
            module,
            params,
            data,
            epochs=settings["epochs"],
            batch=settings["sgd_batch"],
            lr=settings["lr"],
            seed=0,
        )
        run_label = f"{label}, x{scale:g}"
        training += [{"run": run_label, **record} for record in history]
        final[run_label] = history[-1]
        print(f"{run_label}: {history[-1]}", file=sys.stderr)
    write_csv(out / "exploding_profiles.csv", profiles)
    write_csv(out / "exploding_training.csv", training)
    write_json(out / "exploding.json", {"settings": settings, "final": final})
    _plot(out / "exploding.png", profiles, training)
    return final


def _plot(path: Path, profiles, training) -> None:
    fig, axes = figure(3, width=4.2, height=3.8)
    panels = {"relu": axes[0], "tanh": axes[1], "relu + batchnorm": axes[1]}
    for label, (_, scales) in PROFILES.items():
        for scale in scales:
            mine = [r for r in profiles if (r["network"], r["scale"]) == (label, scale)]
            style = "s--" if "batchnorm" in label else "o-"
            panels[label].plot(
                [r["layer"] for r in mine],
                [r["weight_grad"] for r in mine],
                style,
                markersize=3,
                label=f"{label} x{scale:g}",
            )
    for axes_, title in zip(axes[:2], ("ReLU", "tanh; ReLU + batch norm"), strict=True):
        axes_.set_yscale("log")
        axes_.set_xlabel("linear layer (1 = next to the input)")
        axes_.set_ylabel("||dL/dW|| at init")
        axes_.set_title(f"{title}, weights scaled", fontsize=10)
        axes_.legend(fontsize=7)
        axes_.grid(True, alpha=0.3)
    for run_label in dict.fromkeys(r["run"] for r in training):
        mine = [r for r in training if r["run"] == run_label]
        epochs = [r["epoch"] for r in mine]
        losses = [r["loss"] for r in mine]
        # Losses above the ceiling (or non-finite) are drawn on it, with their value written.
        shown = [min(v, CEILING) if math.isfinite(v) else CEILING for v in losses]
        line = axes[2].plot(epochs, shown, ".-", label=run_label)[0]
        for epoch, value in zip(epochs, losses, strict=True):
            if not math.isfinite(value) or value > CEILING:
                text = f"{value:.0e}" if math.isfinite(value) else "nan"
                axes[2].plot([epoch], [CEILING], "^", color=line.get_color())
                axes[2].annotate(
                    text,
                    (epoch, CEILING),
                    xytext=(4, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color=line.get_color(),
                )
    axes[2].set_yscale("log")
    axes[2].set_ylim(top=CEILING * 1.6)
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel(f"training loss (drawn at {CEILING:g} if above or nan)")
    axes[2].set_title("plain SGD, lr 0.05", fontsize=10)
    axes[2].legend(fontsize=7)
    axes[2].grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/exploding"))
    parser.add_argument("--quick", action="store_true", help="4 layers, 2 epochs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    final = run(args.out, quick=args.quick)
    for label, record in final.items():
        print(f"{label:>24}: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
