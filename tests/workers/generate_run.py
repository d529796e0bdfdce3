"""Worker: train the tiny model on arithmetic sequences, then decode greedily through the pipeline.
usage: generate_run.py OUT.json key=value...  (prints/saves the continuation of a fixed progression)"""
import json
import os
import sys

import torch.distributed as dist

from opt_ds.config import load_config
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.train.generate import generate
from opt_ds.train.loop import Trainer


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, overrides, world_size=int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    trainer.train()
    prompt = [100 + 3 * k for k in range(8)]
    tokens = generate(trainer.engine, prompt, max_new_tokens=8, seq_length=cfg.run.batch.seq_length,
                      micro_batch=cfg.run.batch.micro_batch_size)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"prompt": prompt, "tokens": tokens}, f)


if __name__ == "__main__":
    main()
    shutdown_distributed()
