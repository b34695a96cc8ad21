"""Record, then compare, every example's generated-module outputs on fixed inputs.

The safety net for refactors of the emitter (issue 23): before a redesign, record; after it,
compare. Outputs must be the same bits, or differ only where the math was changed on purpose.

    python tools/golden_outputs.py record /tmp/before.npz
    python tools/golden_outputs.py compare /tmp/before.npz      # exit 1 on any difference

For each spec in ``examples/`` and each dtype (float64, float32): ``loss_and_grads`` in
training (loss, every gradient, the running state after the step) and ``predict``'s output, on
the inputs ``symbp.check`` builds (seeded), with a seeded ``rng`` for random layers.
Bits depend on the machine's BLAS kernel: compare on the machine that recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The symbp of this checkout (Python puts tools/ on the path, not the checkout, and an editable
# install would otherwise give another checkout's symbp, e.g. from a git worktree).
sys.path.insert(0, str(ROOT))

import symbp  # noqa: E402
from symbp.checking.gradcheck import input_arrays, load_module, make_inputs  # noqa: E402


def outputs() -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for spec in sorted((ROOT / "examples").glob("*.toml")):
        net = symbp.load_spec(spec)
        module = load_module(symbp.codegen(net), spec.stem)
        for dtype in (np.float64, np.float32):
            tag = f"{spec.stem}/{np.dtype(dtype).name}"
            params, x, y = make_inputs(net, module, batch=4, seed=1)
            params = {k: v.astype(dtype) for k, v in params.items()}
            # By name (a graph may have several inputs); integer ids stay integers.
            inputs = {name: value.astype(dtype) if value.dtype.kind == "f" else value
                      for name, value in input_arrays(net, x).items()}
            if y.dtype.kind == "f":
                y = y.astype(dtype)
            state = module.init_state(dtype=dtype) if hasattr(module, "init_state") else None
            kwargs = {"rng": np.random.default_rng(2)}
            if state is not None:
                kwargs["state"] = state
            loss, grads = module.loss_and_grads(params, **inputs, y=y, **kwargs)
            found[f"{tag}/loss"] = np.asarray(loss)
            for key, value in grads.items():
                found[f"{tag}/grad/{key}"] = np.asarray(value)
            for key, value in (state or {}).items():
                found[f"{tag}/state/{key}"] = np.asarray(value)
            if state is not None:
                found[f"{tag}/predict"] = np.asarray(module.predict(params, **inputs, state=state))
            else:
                found[f"{tag}/predict"] = np.asarray(module.predict(params, **inputs))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "compare"])
    parser.add_argument("file")
    args = parser.parse_args(argv)
    now = outputs()
    if args.action == "record":
        np.savez(args.file, **now)
        print(f"recorded {len(now)} arrays to {args.file}")
        return 0
    with np.load(args.file) as before:
        recorded = {key: before[key] for key in before.files}
    different = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if old is None or new is None:
            different.append(f"{key}: {'new' if old is None else 'gone'}")
        elif old.dtype != new.dtype or old.shape != new.shape:
            different.append(f"{key}: {old.dtype}{old.shape} -> {new.dtype}{new.shape}")
        elif old.tobytes() != new.tobytes():
            scale = max(float(np.max(np.abs(old), initial=0.0)), np.finfo(float).tiny)
            gap = float(np.max(np.abs(old.astype(float) - new.astype(float)), initial=0.0))
            different.append(f"{key}: differs, max |difference| / max |value| = {gap / scale:.2e}")
    for line in different:
        print(line)
    print(f"{len(now)} arrays, {len(different)} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
