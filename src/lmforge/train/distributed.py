"""Data parallelism through torchrun: one process per device, gradients all-reduced (DDP)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a world of one.

    gloo on CPU, nccl on CUDA.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return World(dist.get_rank(), size, local_rank)


def all_reduce_mean(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
