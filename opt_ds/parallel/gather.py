"""Gather the full, unsharded weights of a live pipeline model (for tests and small-model inspection).

TP shards are merged along the dimension megatron-core recorded on each parameter (`partition_dim`),
honouring its `partition_stride` (LLaMA's fused gate/up: every shard is [gate_shard; up_shard]); the
stages' pieces are then collected on every rank with an object all-gather, so this is meant for models
that fit in one process's memory.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return param.detach().clone().cpu()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return merge_shards(shards, param.partition_dim, getattr(param, "partition_stride", 1)).cpu()


def merge_shards(shards, dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from its TP shards. With stride s the full tensor is s sub-tensors (e.g. [gate; up])
    and each shard holds its slice of every one of them, in order: [a_r; b_r]."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([piece[j] for j in range(stride) for piece in pieces], dim=dim)


def split_full(full: torch.Tensor, dim: int, parts: int, stride: int = 1) -> list:
    """The inverse of `merge_shards`: the `parts` TP shards of a full tensor."""
    subs = [sub.chunk(parts, dim=dim) for sub in full.chunk(stride, dim=dim)]
    return [torch.cat([sub[rank] for sub in subs], dim=dim) for rank in range(parts)]


def stage_state(module) -> dict:
    """This stage's parameters, TP-gathered, keyed by global layer index: {"<idx>.<name>": tensor}.

    The tied embedding is keyed by the index of its first occurrence in the layer list (0)."""
    from deepspeed.pipe import TiedLayerSpec
    tied_index = {}
    for idx, spec in enumerate(module._layer_specs):
        if isinstance(spec, TiedLayerSpec):
            tied_index.setdefault(spec.key, idx)
    state = {}
    for key, tied in module.tied_modules.items():
        for name, param in tied.named_parameters():
            state[f"{tied_index[key]}.{name}"] = _full_tensor(param)
    for local_name, _ in module.fwd_map.items():
        layer = getattr(module, local_name)
        for name, param in layer.named_parameters():
            state[f"{local_name}.{name}"] = _full_tensor(param)
    return state


def gather_full_state(module) -> dict:
    """Every stage's TP-gathered parameters merged into one dict, returned on every rank (collective)."""
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, stage_state(module))
    full = {}
    for piece in pieces:
        full.update(piece)
    return full
