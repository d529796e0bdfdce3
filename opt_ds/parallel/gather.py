"""Gather the full, unsharded weights of a live pipeline model (for tests and small-model inspection).

TP shards are concatenated along the dimension megatron-core recorded on each parameter
(`partition_dim`); the stages' pieces are then collected on every rank with an object all-gather, so this
is meant for models that fit in one process's memory.
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
    return torch.cat(shards, dim=param.partition_dim).cpu()


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
