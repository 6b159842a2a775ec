"""Data parallelism over processes (`torchrun`), through torch.distributed only.

Each rank calibrates a disjoint shard of the windows (`shard`); sums (grams, token counts,
Fisher totals) are reduced across ranks where they are complete (`reduce_sum`), so every rank
holds the statistics of all windows; each layer is factorized once, by an owner rank, and
broadcast (`broadcast`); only rank 0 writes. A single process (no `torchrun`) is a world of
one: every function here is then a no-op, so the code paths are the same.

Backend: NCCL on CUDA, gloo on CPU. torchrun's own rendezvous (`--nnodes`, `--rdzv-*`) makes
several nodes work the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> World:
    """Join the process group torchrun set up (env:// rendezvous), once; on CUDA each local rank
    takes its own device. Returns the world (of one without torchrun)."""
    if not launched_by_torchrun() or not dist.is_available():
        return world()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each local rank's own GPU; the device unchanged otherwise."""
    if device.type == "cuda" and launched_by_torchrun() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's windows: every size-th one from its rank on (disjoint, together all)."""
    here = world()
    return windows if here.size == 1 else windows[here.rank :: here.size]


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (unchanged in a world of one)."""
    if world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_count(count: int, device: torch.device | str = "cpu") -> int:
    """An integer summed over the ranks."""
    if world().size == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """`tensor` as rank `source` holds it, on every rank (in place)."""
    if world().size > 1:
        dist.broadcast(tensor, src=source)
    return tensor


def barrier() -> None:
    if world().size > 1:
        dist.barrier()
