"""What synchronous data parallelism costs on this machine, without Ray: the default genomic
model (poscnn) at batch 8 (its default) and 64 per process, trained by one process (1 and 2 torch
threads), by two processes without gradient exchange, and by two DDP processes exchanging
gradients every step: with gloo's all-reduce (DDP's default), and with medray's hook
(`medray.train_common.mean_over_workers_hook`: two workers swap their halves directly).

    .venv/bin/python benchmarks/ddp_floor.py

It separates Ray's overhead from DDP's: `medray train`'s steady samples/s is compared with the
"2 processes, DDP" line (the floor any synchronous data-parallel job on this CPU reaches).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS, WARMUP = 300, 20
BATCHES = (8, 64)


def _model():
    from medray.models import build_model
    from medray.tasks import load_preset

    p = load_preset("genomic")
    torch.manual_seed(0)
    return build_model({"name": p["name"], "params": p["params"]}, [4, 60], 3)


def _loop(model, batch: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 4, 60), torch.randint(0, 3, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(STEPS + WARMUP):
        if i == WARMUP:
            t = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / STEPS


def _worker(rank, exchange, batch, port, out):
    from medray.train_common import DDP_OPTIONS, mean_over_workers_hook

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()
    if exchange:
        model = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS)
        if exchange == "hook":
            model.register_comm_hook(None, mean_over_workers_hook)
    s = _loop(model, batch)
    if rank == 0:
        out.put(s)
    dist.barrier()
    dist.destroy_process_group()


SETUPS = {None: "2 processes, no gradient exchange", "allreduce": "2 processes, DDP, gloo all-reduce (default)",
          "hook": "2 processes, DDP, medray's exchange hook"}


def main():
    print(f"poscnn, {sum(p.numel() for p in _model().parameters()):,} parameters; samples/s of all processes\n")
    print("| setup | " + " | ".join(f"batch {b}: ms per step | samples/s" for b in BATCHES) + " |")
    print("|---|" + "---|---|" * len(BATCHES))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cells = []
        for b in BATCHES:
            s = _loop(_model(), b)
            cells.append(f"{s * 1000:.2f} | {b / s:,.0f}")
        print(f"| 1 process, {threads} thread(s) | " + " | ".join(cells) + " |", flush=True)
    ctx = mp.get_context("spawn")
    port = 29611
    for exchange, name in SETUPS.items():
        cells = []
        for b in BATCHES:
            q = ctx.SimpleQueue()
            mp.start_processes(_worker, args=(exchange, b, port, q), nprocs=2, start_method="spawn")
            port += 1
            s = q.get()
            cells.append(f"{s * 1000:.2f} | {2 * b / s:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
