"""What synchronous data parallelism costs on this machine, without Ray: the default genomic
model (poscnn) at batch 64 trained by one process (1 and 2 torch threads), by two processes
without gradient exchange, and by two DDP processes (gloo all-reduce every step).

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

STEPS, WARMUP, BATCH = 300, 20, 64


def _model():
    from medray.models import build_model
    from medray.tasks import load_preset

    p = load_preset("genomic")
    torch.manual_seed(0)
    return build_model({"name": p["name"], "params": p["params"]}, [4, 60], 3)


def _loop(model) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH, 4, 60), torch.randint(0, 3, (BATCH,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(STEPS + WARMUP):
        if i == WARMUP:
            t = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / STEPS


def _worker(rank, ddp, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    s = _loop(model)
    if rank == 0:
        out.put(s)
    dist.destroy_process_group()


def main():
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        s = _loop(_model())
        rows.append((f"1 process, {threads} thread(s)", s * 1000, BATCH / s))
    ctx = mp.get_context("spawn")
    for ddp, port in ((False, 29611), (True, 29612)):
        q = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(ddp, port, q), nprocs=2, start_method="spawn")
        s = q.get()
        rows.append((f"2 processes, {'DDP (gloo all-reduce each step)' if ddp else 'no gradient exchange'}",
                     s * 1000, 2 * BATCH / s))
    print(f"poscnn, {sum(p.numel() for p in _model().parameters()):,} parameters, batch {BATCH}\n")
    print("| setup | ms per step | samples/s |\n|---|---|---|")
    for name, ms, rate in rows:
        print(f"| {name} | {ms:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
