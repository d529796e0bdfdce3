"""Train an OPT model: `opt-ds train CONFIG.yaml [section.key=value ...]`.

Runs the same way as a single process, under torchrun, and under `deepspeed --hostfile/--num_gpus`:
the world size comes from the launcher and must equal TP x PP x DP of the config.
"""
from __future__ import annotations

import os

from opt_ds.config import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. ds_configs/demo.yaml ('-': none, defaults plus overrides)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the generated DeepSpeed JSON, then exit (without a "
                             "launcher: at the layout the config asks for, DP=1 where parallel.data is auto)")


def run(args) -> int:
    import json
    from opt_ds.slurm import adopt_environment
    adopt_environment()                         # ranks started as srun tasks (opt-ds launch --launcher slurm)
    world_size = os.environ.get("WORLD_SIZE")   # set by every launcher
    if args.print_config:                   # without a launcher: the layout the config asks for (DP "auto" = 1)
        cfg = load_config(args.config, args.overrides, world_size=int(world_size) if world_size else None)
        print(json.dumps({"config": cfg.run.to_dict(), "layout": str(cfg.layout),
                          "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                          "deepspeed": cfg.deepspeed_config()}, indent=2))
        return 0
    cfg = load_config(args.config, args.overrides, world_size=int(world_size or 1))
    from opt_ds.train.loop import Trainer
    downstream = None
    if cfg.run.eval.tasks or cfg.run.eval.perplexity:
        from opt_ds.eval.during_training import DownstreamEvaluation
        downstream = DownstreamEvaluation(cfg)        # checks the tasks and files before any work
    Trainer(cfg, downstream=downstream).train()
    return 0
