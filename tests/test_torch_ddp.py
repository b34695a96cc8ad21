"""Distributed training of the torch target (issue 26, part 3): DistributedDataParallel (gloo,
two processes on 127.0.0.1) takes a few SGD steps, and the parameters equal those of one
process on the combined batch. Nothing distributed is ours: DDP averages the gradients."""

import importlib.util
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from symbp.declare.spec import load_spec  # noqa: E402
from symbp.emit.torch_module import generate_torch_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR = 3, 8, 0.1


def _module(path):
    spec = importlib.util.spec_from_file_location("ddp_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(STEPS, BATCH, 16, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (STEPS, BATCH), generator=generator)
    return x, y


def _train(model, x, y, rank=0, world=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    share = BATCH // world
    for step in range(STEPS):
        rows = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step, rows]), y[step, rows]).backward()
        optimizer.step()


def _worker(rank, path, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        model = _module(path).Ddp(seed=1, dtype=torch.float64)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(ddp, *_data(), rank=rank, world=2)
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPEC = """
name = "ddp"
input = { features = 16 }
loss = "softmax_cross_entropy"
[[layers]]
type = "linear"
out = 12
[[layers]]
type = "activation"
expr = "x*tanh(log(1 + exp(x)))"
[[layers]]
type = "linear"
out = 4
"""


@pytest.mark.slow  # two processes start torch: about 25 s on a 2-core machine
def test_ddp_two_processes_equal_one_on_the_combined_batch(tmp_path):
    spec = tmp_path / "ddp.toml"
    spec.write_text(SPEC)
    path = tmp_path / "ddp_model.py"
    path.write_text(generate_torch_module(load_spec(spec)))
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_worker, args=(str(path), _free_port(), str(out)), nprocs=2)
    single = _module(path).Ddp(seed=1, dtype=torch.float64)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _train(single, *_data())
    distributed = torch.load(out)
    for key, value in single.state_dict().items():
        assert not torch.equal(value, before[key]) or key.endswith(".b")
        torch.testing.assert_close(distributed[key], value, rtol=0, atol=1e-12)
