"""Sample text from a training checkpoint: `opt-ds generate CHECKPOINT_DIR --prompt "..."`.

The model is rebuilt from the run config saved in the checkpoint. Pipeline stages may be re-cut freely, but
tensor-parallel shards may not: run with TP x k processes (k pipeline stages), e.g. one process for a TP=1
checkpoint or `torchrun --nproc_per_node=2 -m opt_ds generate ...` for TP=2; `opt-ds convert` reshards.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from opt_ds.config import ConfigError, ModelConfig, RunConfig, build_dataclass, resolve

# opt_ds.train.checkpoint (torch.distributed) is imported where it is used, so `--help` stays instant.
if TYPE_CHECKING:
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
    from opt_ds.train import checkpoint
    from opt_ds.train.contract import MODEL_FAMILY_KEY, MODEL_SHAPE_KEY, tensor_parallel_degree
    if point.kind == "universal":
        raise checkpoint.CheckpointError(f"{point.directory} is a universal checkpoint, which only an engine with an "
                                         "optimizer can load; use the training checkpoint it was made from, or "
                                         "`opt-ds convert` it --to opt_ds")
    if point.run_state is not None:
        return point.run_state["config"]
    shape = point.saved.get(MODEL_SHAPE_KEY)
    if shape is None:
        raise checkpoint.CheckpointError(f"{point.folder} records neither a run config nor a model shape; it was not "
                                         "written by `opt-ds train` or `opt-ds convert`")
    tensor = tensor_parallel_degree(point.saved, point.folder)
    settable = {f.name for f in dataclasses.fields(ModelConfig)}     # derived entries (layer_norm_eps) are not
    model = {k: v for k, v in shape.items() if k in settable and v is not None}
    model["family"] = point.saved.get(MODEL_FAMILY_KEY, "opt")
    return {"model": model, "parallel": {"tensor": tensor},
            "batch": {"seq_length": min(2048, shape["max_position_embeddings"])}}


def inference_config(saved: dict, world_size: int, pipeline: int | None = None, micro_batch: int = 1):
    """The saved run at this world size for inference: its TP, `pipeline` stages (default: all the
    processes a TP group leaves) and the data-parallel replicas that leaves, no optimizer."""
    if (saved.get("data") or {}).get("train") == []:     # saved before data.train defaulted to null
        saved = {**saved, "data": {**saved["data"], "train": None}}
    # health settings are training-only, and older checkpoints carry retired keys (health.spike_factor)
    run = build_dataclass(RunConfig, {k: v for k, v in saved.items() if k != "health"})
    tp = run.parallel.tensor
    if world_size % tp:
        raise ConfigError(f"the checkpoint is tensor-parallel with TP={tp}: run a multiple of {tp} processes "
                          f"(e.g. torchrun --nproc_per_node={tp} -m opt_ds ...), or reshard it with "
                          "`opt-ds convert`")
    pipeline = pipeline or world_size // tp
    if world_size % (tp * pipeline):
        raise ConfigError(f"{world_size} processes do not fit TP={tp} x PP={pipeline} (the checkpoint's TP times "
                          f"the pipeline stages asked): run a multiple of {tp * pipeline} processes")
    run.parallel.pipeline, run.parallel.data = pipeline, world_size // (tp * pipeline)
    run.batch.micro_batch_size = micro_batch
    run.batch.global_batch_size = micro_batch * run.parallel.data
    run.batch.gradient_accumulation_steps = None
    run.deepspeed = None
    return resolve(run, world_size)


def locate(path: Path) -> checkpoint.ResumePoint:
    """A train.save_dir (its 'latest' pointer) or a checkpoint folder itself, checked against its manifest."""
    from opt_ds.train import checkpoint
    from opt_ds.train.contract import ENGINE_STATES
    if (path / checkpoint.LATEST).is_file() or (path / checkpoint.UNIVERSAL_LATEST).is_file():
        directory, tag = path, None
    elif (path / ENGINE_STATES).is_file():
        directory, tag = path.parent, path.name
    else:
        raise checkpoint.CheckpointError(f"{path} is neither a checkpoint folder nor a train.save_dir with a "
                                         f"'{checkpoint.LATEST}' file")
    check_intact(directory, tag or checkpoint.latest_tag(directory))
    return checkpoint.describe(directory, tag)


def check_intact(directory: Path, tag) -> None:
    """Every file of the checkpoint matches its manifest (SHA-256); the fix names an intact checkpoint to
    generate from instead (training's own fix, resuming with train.load_tag, does not apply here)."""
    from opt_ds.train import checkpoint, manifest
    if tag is None:
        return
    problems = manifest.verify(directory / tag, "sha256")
    if not problems:
        return
    detail = problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
    step = tag.removeprefix("global_step")
    previous = checkpoint.previous_intact(directory, int(step), "sha256") if step.isdigit() else None
    fix = (f"generate from the previous intact checkpoint: opt-ds generate {previous.path} --prompt ..."
           if previous is not None else f"restore {directory / tag} from a copy (no older intact checkpoint is in "
           f"{directory})")
    raise checkpoint.CheckpointError(f"{directory / tag} is damaged ({detail}); {fix}")


def check_sampling(args) -> None:
    """The sampling arguments, before any checkpoint is read."""
    from opt_ds.train.generate import GenerationError
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {args.max_new_tokens} must be >= 1 (tokens to generate), e.g. 64")
    if not 0.0 <= args.top_p <= 1.0:
        raise GenerationError(f"--top-p {args.top_p} must be in [0, 1]: the nucleus probability mass, e.g. 0.9; "
                              "0 is greedy")
    if not args.temperature > 0.0 or args.temperature == float("inf"):
        raise GenerationError(f"--temperature {args.temperature} must be > 0, e.g. 0.8 (lower is more "
                              "deterministic; --top-p 0 is greedy)")


def find_tokenizer(cfg, directory: Path):
    """The run's tokenizer (loop.run_tokenizer); when its recorded folder is gone because the run was moved
    or started from another working directory, the same relative path looked up from the checkpoint's
    folder and its parents (runs/demo/data/x.tokenizer is found as data/x.tokenizer beside a moved
    runs/demo/checkpoints)."""
    from opt_ds.data.files import DatasetFiles
    from opt_ds.data.tokenizer import TokenizerError, load_tokenizer
    from opt_ds.train.loop import run_tokenizer
    try:
        return run_tokenizer(cfg)
    except TokenizerError as err:
        data = cfg.run.data
        recorded = Path(data.tokenizer) if data.tokenizer else DatasetFiles.of(data.train[0].path).tokenizer
        parts = recorded.parts[1:] if recorded.is_absolute() else recorded.parts
        for base in (directory.absolute(), *directory.absolute().parents):
            for start in range(len(parts)):
                candidate = base.joinpath(*parts[start:])
                if candidate.is_dir():
                    try:
                        return load_tokenizer(candidate)
                    except TokenizerError:
                        continue
        raise TokenizerError(f"{err}; the run's tokenizer was not found near {directory} either: pass "
                             "--tokenizer FOLDER (the PREFIX.tokenizer folder of its dataset) or --tokenizer opt") \
            from None


def run(args) -> int:
    from opt_ds.train import checkpoint
    import torch.distributed as dist

    from opt_ds.data.tokenizer import load_tokenizer
    from opt_ds.train.engine import build_engine
    from opt_ds.train.generate import prompt_ids, sample_text

    check_sampling(args)
    point = locate(Path(args.checkpoint))
    cfg = inference_config(saved_run_config(point), int(os.environ.get("WORLD_SIZE", "1")))
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else find_tokenizer(cfg, point.directory)
    prompt_ids(tokenizer, args.prompt, seq_length=cfg.run.batch.seq_length, max_new_tokens=args.max_new_tokens)
    engine = build_engine(cfg, for_training=False)
    checkpoint.load(engine, dataclasses.replace(point, kind="weights"))
    text = sample_text(engine, tokenizer, args.prompt, seq_length=cfg.run.batch.seq_length, micro_batch=1,
                       max_new_tokens=args.max_new_tokens, top_p=args.top_p, temperature=args.temperature,
                       seed=args.seed)
    if dist.get_rank() == 0:
        print(f"{args.prompt}{text}", flush=True)
    return 0
