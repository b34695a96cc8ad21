"""Experiment 2: the same deep MLP trained with plain SGD, with and without batch norm.

A 12-hidden-layer, width-32 MLP (sigmoid, and ReLU) on two spirals, trained with plain
minibatch SGD (batch 64, learning rate 0.05, no momentum) on the ``loss_and_grads`` of the
module symbp generates; the same network with a batch-norm layer after every linear layer
(before the activation). Training loss per epoch and test accuracy (evaluation mode: running
statistics) are recorded; the settings are fixed in this file, not tuned per network.

    python examples/experiments/training_curves.py --out results/training [--quick]

Writes ``training_curves.png``, ``training_curves.csv`` (one row per network and epoch) and
``training_curves.json`` (settings and final numbers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import compile_net, figure, mlp, sgd, two_spirals, write_csv, write_json

NETWORKS = {
    "sigmoid": dict(activation="sigmoid"),
    "sigmoid + batchnorm": dict(activation="sigmoid", batchnorm=True),
    "relu": dict(activation="relu"),
    "relu + batchnorm": dict(activation="relu", batchnorm=True),
}
FULL = dict(depth=12, train=2000, test=1000, epochs=100, batch=64, lr=0.05)
QUICK = dict(depth=4, train=256, test=128, epochs=2, batch=64, lr=0.05)


def run(out: Path, *, quick: bool, settings: dict | None = None) -> dict:
    settings = dict(settings or (QUICK if quick else FULL))
    data = two_spirals(settings["train"], seed=0)
    test = two_spirals(settings["test"], seed=1)
    rows, final = [], {}
    for label, options in NETWORKS.items():
        net = mlp(settings["depth"], **options)
        module = compile_net(net)
        params = module.init_params(seed=0)
        history = sgd(
            module,
            params,
            data,
            epochs=settings["epochs"],
            batch=settings["batch"],
            lr=settings["lr"],
            seed=0,
            test=test,
        )
        rows += [{"network": label, **record} for record in history]
        final[label] = history[-1]
        print(f"{label}: {history[-1]}", file=sys.stderr)
    write_csv(out / "training_curves.csv", rows)
    write_json(out / "training_curves.json", {"settings": settings, "final": final})
    _plot(out / "training_curves.png", rows, settings)
    return final


def _plot(path: Path, rows, settings) -> None:
    fig, (loss_axes, accuracy_axes) = figure(2, width=5.0, height=3.8)
    for label in NETWORKS:
        mine = [r for r in rows if r["network"] == label]
        epochs = [r["epoch"] for r in mine]
        style = "--" if "batchnorm" in label else "-"
        line = loss_axes.plot(epochs, [r["loss"] for r in mine], style, label=label)[0]
        accuracy_axes.plot(
            epochs, [r.get("test_accuracy") for r in mine], style, color=line.get_color()
        )
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (mean over the epoch)")
    loss_axes.set_yscale("log")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy")
    accuracy_axes.set_ylim(0.4, 1.0)
    for axes in (loss_axes, accuracy_axes):
        axes.grid(True, alpha=0.3)
    loss_axes.legend(fontsize=8)
    fig.suptitle(
        f"{settings['depth']} hidden layers, width 32, plain SGD (lr {settings['lr']}, "
        f"batch {settings['batch']}), two spirals",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/training_curves"))
    parser.add_argument("--quick", action="store_true", help="4 layers, 2 epochs, 256 points")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    final = run(args.out, quick=args.quick)
    for label, record in final.items():
        print(f"{label:>20}: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
