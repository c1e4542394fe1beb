"""Spawning a CPU process group (gloo) for the distributed tests: `spawn(worker, *args)` runs
``worker(world, *args)`` on every rank; an assertion failing on any rank fails the test (the other
ranks are terminated, and collectives time out rather than hang)."""

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfa_kernels.zoo.distributed import World


def _entry(rank, worker, size, store, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a file store, not a TCP port: no race for a free port with other processes on a busy machine
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=180)
    )
    try:
        worker(World(rank, size, rank), *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, *args, size: int = 2) -> None:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_entry, args=(worker, size, os.path.join(folder, "store"), args), nprocs=size, join=True)


def gather_all(world, obj) -> list:
    """Every rank's `obj` (all_gather_object)."""
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
