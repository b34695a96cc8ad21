"""examples/train_digits.py: a generated module trained on a real data set (scikit-learn's
8x8 digits), in its quick mode."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_digits_quick_learns(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("train_digits", None)
    example = importlib.import_module("train_digits")
    assert example.main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("epoch")]
    accuracy = float(lines[-1].split()[-1])
    assert len(losses) == 3 and losses[-1] < losses[0]
    # Ten classes: chance is 0.1; three epochs on 400 images already reach well above it.
    assert accuracy > 0.6
    sys.modules.pop("train_digits", None)
