"""Sample text from a training checkpoint: `opt-ds generate CHECKPOINT_DIR --prompt "..."`.

The model is rebuilt from the run config saved in the checkpoint. Pipeline stages may be re-cut freely, but
tensor-parallel shards may not: run with TP x k processes (k pipeline stages), e.g. one process for a TP=1
checkpoint or `torchrun --nproc_per_node=2 -m opt_ds generate ...` for TP=2; `opt-ds convert` reshards.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from opt_ds.config import ConfigError, RunConfig, build_dataclass, resolve
from opt_ds.train import checkpoint


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a train.save_dir (uses its 'latest') or a global_step* folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", help="'opt', a tokenizer.json, or a folder with vocab.json + merges.txt "
                                            "(default: the one the run was configured with)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass; 0 = greedy")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)


def saved_run_config(point: checkpoint.ResumePoint) -> dict:
    """The run config a checkpoint was trained with; for a weights-only checkpoint written by
    `opt-ds convert`, one built from its stored model shape and the TP degree of its files."""
    from opt_ds.config.sections import ModelConfig
    from opt_ds.parallel.checkpoint_info import MODEL_FAMILY_KEY, MODEL_SHAPE_KEY
    if point.kind == "universal":
        raise checkpoint.CheckpointError(f"{point.directory} is a universal checkpoint, which only an engine with an "
                                         "optimizer can load; generate from the training checkpoint it was made from")
    if point.run_state is not None:
        return point.run_state["config"]
    shape = point.saved.get(MODEL_SHAPE_KEY)
    if shape is None:
        raise checkpoint.CheckpointError(f"{point.folder} records neither a run config nor a model shape; it was not "
                                         "written by `opt-ds train` or `opt-ds convert`")
    tensor = max(1, len(list(point.folder.glob("layer_00-model_*-model_states.pt"))))
    settable = {f.name for f in dataclasses.fields(ModelConfig)}
    model = {k: v for k, v in shape.items() if k in settable and v is not None}
    model["family"] = point.saved.get(MODEL_FAMILY_KEY, "opt")
    return {"model": model, "parallel": {"tensor": tensor},
            "batch": {"seq_length": min(2048, shape["max_position_embeddings"])}}


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


def locate(path: Path) -> checkpoint.ResumePoint:
    """A train.save_dir (its 'latest' pointer) or a checkpoint folder itself."""
    if (path / checkpoint.LATEST).is_file() or (path / checkpoint.UNIVERSAL_LATEST).is_file():
        return checkpoint.describe(path)
    if (path / "mp_rank_00_model_states.pt").is_file():
        return checkpoint.describe(path.parent, tag=path.name)
    raise checkpoint.CheckpointError(f"{path} is neither a checkpoint folder nor a train.save_dir with a "
                                     f"'{checkpoint.LATEST}' file")


def run(args) -> int:
    import torch.distributed as dist

    from opt_ds.data.tokenizer import load_tokenizer
    from opt_ds.train.engine import build_engine
    from opt_ds.train.generate import sample_text
    from opt_ds.train.loop import run_tokenizer

    point = locate(Path(args.checkpoint))
    cfg = inference_config(saved_run_config(point), int(os.environ.get("WORLD_SIZE", "1")))
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else run_tokenizer(cfg)
    engine = build_engine(cfg, for_training=False)
    checkpoint.load(engine, dataclasses.replace(point, kind="weights"))
    text = sample_text(engine, tokenizer, args.prompt, seq_length=cfg.run.batch.seq_length, micro_batch=1,
                       max_new_tokens=args.max_new_tokens, top_p=args.top_p, temperature=args.temperature,
                       seed=args.seed)
    if dist.get_rank() == 0:
        print(f"{args.prompt}{text}", flush=True)
    return 0
