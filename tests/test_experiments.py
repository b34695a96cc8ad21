"""The gradient-flow experiments under ``examples/experiments/``, in their quick mode: each runs,
writes its figure and data, and shows the effect it is about where that effect is large."""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

FOLDER = Path(__file__).resolve().parent.parent / "examples" / "experiments"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def experiment(monkeypatch):
    monkeypatch.syspath_prepend(str(FOLDER))

    def load(name):
        for module in ("common", name):
            sys.modules.pop(module, None)
        return importlib.import_module(name)

    yield load
    for module in ("common", "depth_sweep", "training_curves", "exploding"):
        sys.modules.pop(module, None)


def rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_two_spirals_are_standardised_and_balanced(experiment):
    common = experiment("common")
    points, labels = common.two_spirals(2000, seed=3)
    assert points.shape == (2000, 2) and set(labels) == {0, 1}
    np.testing.assert_allclose(points.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(points.std(axis=0), 1, atol=1e-12)
    assert 0.45 < labels.mean() < 0.55


def test_depth_sweep_quick(experiment, tmp_path, capsys):
    module = experiment("depth_sweep")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "depth_sweep.png").read_bytes()[:8] == PNG
    summary = json.loads((tmp_path / "depth_sweep.json").read_text(encoding="utf-8"))
    assert summary["depths"] == [2, 8]
    table = rows(tmp_path / "depth_sweep.csv")
    assert len(table) == len(module.NETWORKS) * 2
    assert all(math.isfinite(float(r["first_layer_grad"])) for r in table)
    # Six sigmoid derivatives of at most 1/4 between depth 2 and 8: the gradient at the first
    # layer drops by orders of magnitude.
    sigmoid = summary["networks"]["sigmoid"]["geometric_mean"]
    assert sigmoid[1] < sigmoid[0] / 100
    # The proved bound is an upper bound on |dL/d input| at every depth and network.
    for r in table:
        assert float(r["input_grad"]) <= float(r["input_grad_bound"]) * (1 + 1e-9)


def test_training_curves_quick(experiment, tmp_path, capsys):
    module = experiment("training_curves")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == PNG
    table = rows(tmp_path / "training_curves.csv")
    assert {r["network"] for r in table} == set(module.NETWORKS)
    assert len(table) == len(module.NETWORKS) * module.QUICK["epochs"]
    for r in table:
        assert math.isfinite(float(r["loss"])) and 0 <= float(r["test_accuracy"]) <= 1


def test_sgd_lowers_the_loss_of_a_shallow_net(experiment):
    """The training loop itself: a 2-layer ReLU net on the spirals gets better with SGD."""
    common = experiment("common")
    net = common.mlp(2, "relu")
    module = common.compile_net(net)
    params = module.init_params(seed=0)
    data = common.two_spirals(512, seed=0)
    history = common.sgd(module, params, data, epochs=5, batch=32, lr=0.1, seed=0, test=data)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert history[-1]["test_accuracy"] > 0.55


def test_exploding_quick(experiment, tmp_path, capsys):
    module = experiment("exploding")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "exploding.png").read_bytes()[:8] == PNG
    profiles = rows(tmp_path / "exploding_profiles.csv")

    def first_layer(network, scale):
        (row,) = [
            r
            for r in profiles
            if (r["network"], float(r["scale"]), r["layer"]) == (network, scale, "1")
        ]
        return float(row["weight_grad"])

    # ReLU is positively homogeneous: four times larger weights over four layers and a head
    # multiply the signal by 4**5, and the first layer's gradient grows by orders of magnitude.
    assert first_layer("relu", 2.0) > 100 * first_layer("relu", 0.5)
    training = rows(tmp_path / "exploding_training.csv")
    assert {r["run"] for r in training} == {
        "relu, x1",
        "relu, x1.5",
        "relu, x2",
        "relu + batchnorm, x2",
    }
