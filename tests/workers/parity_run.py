"""Worker for the layout-parity tests: train with the real Trainer and record what the tests compare.

usage: parity_run.py JOBS.json   (under torchrun; the world size gives DP)
JOBS.json: a list of [OUT.pt, [key=value, ...]], trained one after another in this world (each job's layout
must fill the world), which spares the tests an interpreter start per layout.
Saves on rank 0, per job: the gathered full weights after init and after training, and for every rank that holds
a copy of the tied embedding, (stage, tp, dp, its shard) so the test can check the copies are bit-identical.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opt_ds.config import load_config
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.models.opt.pipeline import TIED_EMBEDDING_KEY
from opt_ds.train.loop import Trainer

from conversion.sharding import merge_shards


# The full, unsharded weights of a live pipeline model: TP shards merged along the dimension megatron-core
# recorded on each parameter (`partition_dim`, `partition_stride`), the stages' pieces all-gathered.
def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return param.detach().clone().cpu()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return merge_shards(shards, param.partition_dim, getattr(param, "partition_stride", 1)).cpu()


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


def tied_copies(engine) -> list:
    module = engine.module
    mine = []
    if TIED_EMBEDDING_KEY in module.tied_modules:
        weight = module.tied_modules[TIED_EMBEDDING_KEY].word_embeddings.weight.detach().float().cpu().clone()
        coord = module._topo.get_coord(dist.get_rank())
        mine = [(coord.pipe, coord.model, coord.data, weight)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [entry for piece in gathered for entry in piece]


def run_job(out, overrides):
    cfg = load_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = Trainer(cfg)
    init = gather_full_state(trainer.engine.module)
    trainer.train()
    final = gather_full_state(trainer.engine.module)
    tied = tied_copies(trainer.engine)
    if dist.get_rank() == 0:
        torch.save({"init": init, "final": final, "tied": tied}, out)


def main():
    jobs = json.loads(open(sys.argv[1]).read())
    for out, overrides in jobs:
        run_job(out, overrides)
        dist.barrier()
        parallel_state.destroy_model_parallel()     # the next job's layout builds its own groups


if __name__ == "__main__":
    main()
    shutdown_distributed()
