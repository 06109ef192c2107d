"""The gradient exchange of two CPU workers (`medray.train_common.mean_over_workers_`): two real
gloo processes on 127.0.0.1, as Ray Train's workers run it, no Ray needed."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out) -> None:
    from medray.train_common import average_buffers, mean_over_workers_, mean_over_workers_hook

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # a tensor: its mean over both ranks, identical bits on both
        x = torch.randn(10_001, generator=torch.Generator().manual_seed(rank))
        ref = x.clone()
        dist.all_reduce(ref)
        got = mean_over_workers_(x.clone())
        # DDP with the hook: each rank's gradients become the mean of both ranks' own gradients
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(10 + rank))
        net(inputs).square().sum().backward()
        own = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        for p in net.parameters():
            p.grad = None
        ddp = torch.nn.parallel.DistributedDataParallel(net, forward_sync_buffers=False)
        ddp.register_comm_hook(None, mean_over_workers_hook)
        ddp(inputs).square().sum().backward()
        exchanged = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        average_buffers(ddp)  # BatchNorm statistics: each rank saw its own batch
        stats = net[1].running_mean.clone()
        # numpy copies: torch tensors would travel as shared memory the exiting process takes along
        out.put((rank, *(t.numpy() for t in (got, ref / 2, own, exchanged, stats))))
        dist.barrier()  # both done before the group goes (DDP's teardown otherwise can abort)
    finally:
        dist.destroy_process_group()


def test_two_cpu_workers_exchange_the_exact_mean_and_stay_identical():
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, start_method="spawn", join=False)
    res = dict((r[0], r[1:]) for r in (out.get(), out.get()))  # read before joining: the pipe is small
    while not procs.join(timeout=60):
        pass
    (got0, ref0, own0, ex0, bn0), (got1, ref1, own1, ex1, bn1) = res[0], res[1]
    assert np.array_equal(got0, got1)  # the same bits on both ranks: the replicas cannot drift
    assert np.allclose(got0, ref0, atol=1e-6) and np.allclose(got0, ref1, atol=1e-6)
    assert not np.allclose(own0, own1)  # the ranks' own gradients differ (different batches) ...
    assert np.array_equal(ex0, ex1)  # ... and DDP with the hook leaves both with their mean
    assert np.allclose(ex0, (own0 + own1) / 2, atol=1e-6)
    assert np.array_equal(bn0, bn1) and not np.allclose(bn0, 0)
