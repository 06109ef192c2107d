"""What synchronous data parallelism costs on this machine, without Ray: a task's default model
(genomic: poscnn at batch 8, its default, and 64; ultrasound: the ensemble of three 64×64 convnets at
batch 32, its default, each member on its own loss) trained by one process (1 and 2 torch threads),
by two processes without gradient exchange, and by two DDP processes exchanging gradients every
step: with gloo's all-reduce (DDP's default), and with medray's hook
(`medray.train_common.mean_over_workers_hook`: two workers swap their halves directly).

    .venv/bin/python benchmarks/ddp_floor.py
    .venv/bin/python benchmarks/ddp_floor.py --task ultrasound

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

# task: (input shape, batch sizes per process, steps, warm-up steps)
TASKS = {"genomic": ([4, 60], (8, 64), 300, 20), "ultrasound": ([1, 64, 64], (32,), 60, 5)}


def _model(task):
    from medray.models import Ensemble, build_model, preset_arch
    from medray.tasks import load_preset

    torch.manual_seed(0)
    model = build_model(preset_arch(load_preset(task)), TASKS[task][0], 3)
    return model, isinstance(model, Ensemble)


def _loop(task, model, ensemble: bool, batch: int) -> float:
    shape, _, steps, warmup = TASKS[task]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape), torch.randint(0, 3, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(steps + warmup):
        if i == warmup:
            t = time.perf_counter()
        if ensemble:  # each member on its own loss, as medray's training loop does
            loss = torch.stack([loss_fn(z, y) for z in model(x, members=True)]).sum()
        else:
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def _worker(rank, task, exchange, batch, port, out):
    from medray.train_common import DDP_OPTIONS, mean_over_workers_hook

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, ensemble = _model(task)
    if exchange:
        model = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS)
        if exchange == "hook":
            model.register_comm_hook(None, mean_over_workers_hook)
    s = _loop(task, model, ensemble, batch)
    if rank == 0:
        out.put(s)
    dist.barrier()
    dist.destroy_process_group()


SETUPS = {None: "2 processes, no gradient exchange", "allreduce": "2 processes, DDP, gloo all-reduce (default)",
          "hook": "2 processes, DDP, medray's exchange hook"}


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="genomic")
    task = parser.parse_args().task
    batches = TASKS[task][1]
    from medray.models import describe, preset_arch
    from medray.tasks import load_preset

    model, _ = _model(task)
    print(f"{task}: {describe(preset_arch(load_preset(task)))}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; samples/s of all processes\n")
    print("| setup | " + " | ".join(f"batch {b}: ms per step | samples/s" for b in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cells = []
        for b in batches:
            s = _loop(task, *_model(task), b)
            cells.append(f"{s * 1000:.2f} | {b / s:,.0f}")
        print(f"| 1 process, {threads} thread(s) | " + " | ".join(cells) + " |", flush=True)
    ctx = mp.get_context("spawn")
    port = 29611
    for exchange, name in SETUPS.items():
        cells = []
        for b in batches:
            q = ctx.SimpleQueue()
            mp.start_processes(_worker, args=(task, exchange, b, port, q), nprocs=2, start_method="spawn")
            port += 1
            s = q.get()
            cells.append(f"{s * 1000:.2f} | {2 * b / s:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
