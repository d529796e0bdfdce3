"""Small collectives for decisions every rank must take together (they work in a 1-process world too)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(make):
    """`make()` evaluated on rank 0 only and sent to every rank (e.g. one listing of a shared folder)."""
    rank, world = rank_and_world()
    value = [make() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flags: list) -> list:
    """Element-wise OR of boolean flags over all ranks: one small all-reduce, so a condition seen by one
    rank only (a NaN, a signal) becomes everyone's decision and no rank is left waiting in a collective."""
    _, world = rank_and_world()
    if world == 1:
        return [bool(f) for f in flags]
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags], device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.cpu().tolist()]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
