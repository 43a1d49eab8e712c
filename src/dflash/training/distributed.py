"""Process groups and FSDP2 sharding of the drafter (torchrun, Ray Train, or one process)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from dflash.modeling.drafter import DFlashDrafter


def init_distributed() -> tuple[int, int, str]:
    """(rank, world size, device); starts the process group when launched by torchrun or Ray Train."""
    if dist.is_initialized():                      # Ray Train starts the process group itself
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, "cuda" if cuda else "cpu"


def shard(drafter: DFlashDrafter, device: str, world: int) -> None:
    """FSDP2 with one unit per decoder layer; bf16 compute on GPU, fp32 master weights and reductions.

    On GPU this applies to a single rank too: the bf16 copy of each layer then exists only while it runs."""
    if world == 1 and device != "cuda":
        return
    if not dist.is_initialized():                  # one GPU: a single-rank group in memory, for the device mesh
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device, (world,))
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in drafter.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(drafter, mesh=mesh, mp_policy=policy)


def all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def broadcast_path(path: Path | None, rank: int, world: int) -> Path | None:
    if world == 1:
        return path
    box = [str(path) if path else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None
