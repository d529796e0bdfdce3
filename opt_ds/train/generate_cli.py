"""Sample text from a training checkpoint: `opt-ds generate CHECKPOINT_DIR --prompt "..."`.

The model is rebuilt from the run config saved in the checkpoint. Pipeline stages may be re-cut freely, but
tensor-parallel shards may not: run with TP x k processes (k pipeline stages), e.g. one process for a TP=1
checkpoint or `torchrun --nproc_per_node=2 -m opt_ds generate ...` for TP=2; `opt-ds convert` reshards.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from opt_ds.config import ConfigError, RunConfig, build_dataclass, resolve
from opt_ds.train import checkpoint


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a train.save_dir (uses its 'latest') or a global_step* folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", help="'opt' or a folder with vocab.json + merges.txt "
                                            "(default: the one the run was configured with)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass; 0 = greedy")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)


def saved_run_config(checkpoint_dir: Path, tag: str) -> dict:
    states = checkpoint_dir / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise checkpoint.CheckpointError(f"{states} is missing: {checkpoint_dir / tag} is not a complete opt_ds "
                                         "checkpoint")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    if "opt_ds" not in saved:
        raise checkpoint.CheckpointError(f"{states} has no opt_ds run config; it was not written by `opt-ds train`")
    return saved["opt_ds"]["config"]


def inference_config(saved: dict, world_size: int):
    run = build_dataclass(RunConfig, saved)
    tp = run.parallel.tensor
    if world_size % tp:
        raise ConfigError(f"the checkpoint is tensor-parallel with TP={tp}: run a multiple of {tp} processes "
                          f"(e.g. torchrun --nproc_per_node={tp} -m opt_ds generate ...), or reshard it with "
                          "`opt-ds convert`")
    run.parallel.pipeline, run.parallel.data = world_size // tp, 1
    run.batch.micro_batch_size = run.batch.global_batch_size = 1
    run.batch.gradient_accumulation_steps = None
    run.deepspeed = None
    return resolve(run, world_size)


def locate(path: Path) -> tuple:
    """(save_dir, tag) for either a save_dir with a 'latest' pointer or a checkpoint folder itself."""
    if (path / checkpoint.LATEST).is_file():
        return path, checkpoint.latest_tag(path)
    if (path / "mp_rank_00_model_states.pt").is_file():
        return path.parent, path.name
    raise checkpoint.CheckpointError(f"{path} is neither a checkpoint folder nor a train.save_dir with a "
                                     f"'{checkpoint.LATEST}' file")


def run(args) -> int:
    import torch.distributed as dist

    from opt_ds.data.tokenizer import BPETokenizer
    from opt_ds.train.engine import build_engine
    from opt_ds.train.generate import sample_text

    save_dir, tag = locate(Path(args.checkpoint))
    cfg = inference_config(saved_run_config(save_dir, tag), int(os.environ.get("WORLD_SIZE", "1")))
    tokenizer = BPETokenizer.load(args.tokenizer or cfg.run.data.tokenizer or "opt")
    engine = build_engine(cfg, for_training=False)
    checkpoint.load(engine, save_dir, tag, module_only=True)
    text = sample_text(engine, tokenizer, args.prompt, seq_length=cfg.run.batch.seq_length, micro_batch=1,
                       max_new_tokens=args.max_new_tokens, top_p=args.top_p, temperature=args.temperature,
                       seed=args.seed)
    if dist.get_rank() == 0:
        print(f"{args.prompt}{text}", flush=True)
    return 0
