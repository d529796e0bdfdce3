"""Worker for the layout-parity tests: train with the real Trainer and record what the tests compare.

usage: parity_run.py OUT.pt key=value...   (under torchrun; the world size gives DP)
Saves on rank 0: the gathered full weights after init and after training, and for every rank that holds a
copy of the tied embedding, (stage, tp, dp, its shard) so the test can check the copies are bit-identical.
"""
import os
import sys

import torch
import torch.distributed as dist

from opt_ds.config import load_config
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.parallel.gather import gather_full_state
from opt_ds.models.opt.pipeline import TIED_EMBEDDING_KEY
from opt_ds.train.loop import Trainer


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


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = Trainer(cfg)
    init = gather_full_state(trainer.engine.module)
    trainer.train()
    final = gather_full_state(trainer.engine.module)
    tied = tied_copies(trainer.engine)
    if dist.get_rank() == 0:
        torch.save({"init": init, "final": final, "tied": tied}, out)


if __name__ == "__main__":
    main()
    shutdown_distributed()
