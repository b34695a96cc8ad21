"""Train symbp's PyTorch-target module with DistributedDataParallel (issue 26, part 3).

    torchrun --nproc_per_node 2 examples/experiments/ddp_train.py [SPEC]

(with this checkout importable as ``symbp``: ``pip install -e .`` or ``PYTHONPATH=.``).

Each process generates the module for SPEC (default examples/mlp_bn.toml) with
``symbp codegen --target torch``, takes its share of each batch, and DDP averages the
gradients of symbp's derived backward over the processes (gloo on CPU, nccl on CUDA). Rank 0
prints the loss; nothing distributed is symbp's.
"""

import importlib.util
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import symbp

ROOT = Path(__file__).resolve().parents[2]


def _train(spec, cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.py"
        path.write_text(symbp.codegen(spec, target="torch"))
        loaded = importlib.util.spec_from_file_location("model", path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    name = "".join(p[:1].upper() + p[1:] for p in symbp.load_spec(spec).name.split("_"))
    model = getattr(module, name)(seed=0, dtype=torch.float32, device=device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)  # every rank draws the same data
    batch = 64
    for step in range(20):
        x = torch.randn(batch, *module.INPUT_SHAPE, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        share = slice(rank * batch // world, (rank + 1) * batch // world)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x[share].to(device)), y[share].to(device))
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f} (rank 0's share)")


def main():
    spec = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "examples" / "mlp_bn.toml")
    cuda = torch.cuda.is_available()
    # a bounded wait: a process that never arrives is an error, not a hang
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=2))
    try:
        _train(spec, cuda)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
