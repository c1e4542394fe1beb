"""Spawning a CPU process group (gloo) for the distributed tests: `spawn(worker, *args)` runs
``worker(world, *args)`` on every rank; an assertion failing on any rank fails the test (the other
ranks are terminated, and collectives time out rather than hang)."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfa_kernels.zoo.distributed import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, worker, size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=180))
    try:
        worker(World(rank, size, rank), *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, *args, size: int = 2) -> None:
    mp.spawn(_entry, args=(worker, size, free_port(), args), nprocs=size, join=True)


def gather_all(world, obj) -> list:
    """Every rank's `obj` (all_gather_object)."""
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
