"""Evaluate a checkpoint: `opt-ds eval CHECKPOINT --tasks T1,T2 [--num-fewshot K] [--limit N]
[--include-path DIR] [--output DIR] [--perplexity FILE]`.

Tasks, prompts and metrics are lm-evaluation-harness's (docs/eval.md); the model runs on the opt_ds pipeline
engine rebuilt from the checkpoint, in one process, under torchrun or under `deepspeed --hostfile`: the
world size must be a multiple of the checkpoint's TP degree; `--pipeline P` stages (default: all the
processes a TP group leaves) and the data-parallel replicas the rest make. Prints the papers' table (task,
metric, value, stderr) and writes the harness's results JSON under --output.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from opt_ds.errors import UserError

RESULTS_FILE = "results.json"


class EvalError(UserError):
    """Arguments `opt-ds eval` cannot run with; the message says how to fix them."""


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a train.save_dir (uses its 'latest') or a checkpoint folder: training, "
                                           "universal, or weights-only from `opt-ds convert --to opt_ds`")
    parser.add_argument("--tasks", default="", help="comma-separated harness task names, e.g. hellaswag,piqa "
                                                    "(opt_ds_tiny_mc and opt_ds_tiny_cloze ship with opt_ds)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's, or 0)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of extra task YAML files "
                                                                              "(repeatable)")
    parser.add_argument("--perplexity", action="append", default=[], metavar="FILE",
                        help="a text file, JSONL file ('text') or dataset prefix to measure perplexity on (repeatable)")
    parser.add_argument("--window", type=int, help="perplexity window in tokens (default: batch.seq_length of the run)")
    parser.add_argument("--stride", type=int, help="new tokens per perplexity window (default: the window)")
    parser.add_argument("--output", help="folder for results.json (default: print only)")
    parser.add_argument("--tokenizer", help="'opt' or a folder with vocab.json + merges.txt (default: the run's)")
    parser.add_argument("--pipeline", type=int, help="pipeline stages (default: world size / the checkpoint's TP)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    parser.add_argument("--log-samples", action="store_true",
                        help="keep every request and response (log-likelihoods) in results.json")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for the stderr of non-mean metrics (default 1000)")


def run(args) -> int:
    import torch.distributed as dist

    from opt_ds.eval import perplexity as ppl
    from opt_ds.eval import tasks as harness_tasks
    from opt_ds.train import checkpoint
    from opt_ds.train.engine import build_engine
    from opt_ds.train.generate_cli import inference_config, locate, saved_run_config

    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names and not args.perplexity:
        raise EvalError("nothing to evaluate: give --tasks T1,T2 and/or --perplexity FILE")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or \
            (args.num_fewshot is not None and args.num_fewshot < 0):
        raise EvalError("--batch-size and --limit must be >= 1, --num-fewshot >= 0")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not output.is_dir():
        raise EvalError(f"--output {output} is a file; give a folder")
    point = locate(Path(args.checkpoint))
    universal = point.kind == "universal" and point.run_state is not None
    saved = point.run_state["config"] if universal else saved_run_config(point)
    cfg = inference_config(saved, int(os.environ.get("WORLD_SIZE", "1")), args.pipeline, args.batch_size)
    tokenizer = checked_tokenizer(args.tokenizer, saved, cfg.shape.vocab_size, point.directory)
    max_length = cfg.shape.max_position_embeddings     # as the harness's HF class on the export
    window = args.window or min(cfg.run.batch.seq_length, max_length)
    stride = args.stride or window
    if not 0 < window <= max_length or not 0 < stride <= window:
        raise EvalError(f"need 1 <= --stride <= --window <= {max_length} (the model's positions); got window "
                        f"{window}, stride {stride}")
    for source in args.perplexity:
        ppl.check_source(source)
    manager = None
    if names:
        manager = harness_tasks.task_manager(names, args.include_path)
        harness_tasks.check_loadable(manager, names)

    # a universal checkpoint loads only into an engine with an optimizer (its fp32 weights live in the
    # optimizer state); any other as weights only
    engine = build_engine(cfg, for_training=universal, load_universal=universal)
    checkpoint.load(engine, point if universal else dataclasses.replace(point, kind="weights"))
    rank0 = dist.get_rank() == 0
    say = (lambda line: print(f"[opt_ds] eval {line}", flush=True)) if rank0 else None
    from opt_ds.eval.harness import OptDsLM
    lm = OptDsLM(engine, tokenizer, max_length=max_length, micro_batch=args.batch_size, progress=say)
    results = {}
    if names:
        results = harness_tasks.evaluate(lm, manager, names, num_fewshot=args.num_fewshot, limit=args.limit,
                                         bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples) or {}
    perplexities = [ppl.perplexity(lm.scorer, tokenizer, source, window=window, stride=stride)
                    for source in args.perplexity]
    if not rank0:
        return 0
    if names:
        print(harness_tasks.table(results), flush=True)
    for measured in perplexities:
        print(measured, flush=True)
    if output is not None:
        write_results(output, results, perplexities, point)
    return 0


def checked_tokenizer(spec, saved: dict, vocab_size: int, where):
    from opt_ds.data.tokenizer import load_tokenizer, tokenizer_of_run
    tokenizer = load_tokenizer(spec) if spec else tokenizer_of_run(saved.get("data", {}))
    if tokenizer is None:
        raise EvalError(f"{where} records no tokenizer (its run trained on synthetic tokens, or it was converted): "
                        "pass --tokenizer opt or --tokenizer DIR with vocab.json + merges.txt")
    if tokenizer.vocab_size > vocab_size:
        raise EvalError(f"the tokenizer {tokenizer.vocab_file.parent} has {tokenizer.vocab_size} entries, more than the "
                        f"checkpoint's vocabulary of {vocab_size}: it belongs to another model; pass the run's "
                        "tokenizer with --tokenizer")
    return tokenizer


def write_results(output: Path, results: dict, perplexities: list, point) -> Path:
    from lm_eval.utils import handle_non_serializable
    from opt_ds.durable import write_atomically
    output.mkdir(parents=True, exist_ok=True)
    document = {**results, "checkpoint": str(point.folder),
                "perplexity": [p.as_dict() for p in perplexities]}
    path = output / RESULTS_FILE
    write_atomically(path, json.dumps(document, indent=2, default=handle_non_serializable) + "\n")
    print(f"[opt_ds] eval wrote {path}", flush=True)
    return path
