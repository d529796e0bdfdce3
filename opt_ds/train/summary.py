"""Summarise a run from its metrics.jsonl: `opt-ds summary LOG_DIR`.

Prints the validation loss at the first and last evaluation, the training-loss trend, throughput, the last
checkpoint and the text sample, so a person can see at a glance whether the model learned.
"""
from __future__ import annotations

import math
from pathlib import Path

from opt_ds.errors import UserError
from opt_ds.train.metrics import read_metrics


def add_arguments(parser) -> None:
    parser.add_argument("log_dir", help="the run's train.log_dir (holds metrics.jsonl)")


def summarize(records: list) -> list:
    lines = []
    evals = [r for r in records if r["event"] == "eval"]
    trains = [r for r in records if r["event"] == "train"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"validation loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
                     f"{last['step']} (perplexity {math.exp(first['loss']):.0f} -> {math.exp(last['loss']):.1f})")
    if trains:
        lines.append(f"training loss:   {trains[0]['loss']:.3f} at step {trains[0]['step']} -> {trains[-1]['loss']:.3f} "
                     f"at step {trains[-1]['step']}")
        speeds = sorted(r["tokens_per_second"] for r in trains)
        tflops = sorted(r["model_tflops_per_gpu"] for r in trains)
        lines.append(f"throughput:      {speeds[len(speeds) // 2]:.0f} tokens/s, {tflops[len(tflops) // 2]:.4f} model "
                     f"TFLOP/s per process (medians over {len(trains)} log lines)")
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    if checkpoints:
        lines.append(f"checkpoint:      {checkpoints[-1]['path']}")
    for sample in (r for r in records if r["event"] == "sample"):
        text = f"{sample['prompt']}{sample['text']}".strip("\n")
        lines.append(f"sample at step {sample['step']}:\n" + "\n".join(f"    {line}" for line in text.splitlines()))
    return lines


def run(args) -> int:
    path = Path(args.log_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the run's train.log_dir")
    print("\n".join(summarize(read_metrics(path))))
    return 0
