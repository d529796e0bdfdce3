"""Summarise a run from its metrics.jsonl: `opt-ds summary LOG_DIR`.

Prints the validation loss at the first and last evaluation, the training-loss trend, throughput, the last
checkpoint and the text sample, so a person can see at a glance whether the model learned.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from opt_ds.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("log_dir", help="the run's train.log_dir (holds metrics.jsonl)")


def read_records(path: Path) -> tuple:
    """(records, notes) of a metrics.jsonl. A truncated last line (the run was killed mid-write) is left out
    with a note; a damaged line elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records, notes = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
        elif number == len(lines):
            notes.append(f"note: line {number} is cut short (the run stopped while writing it) and is left out")
        else:
            raise UserError(f"{path}:{number} is not a metrics record (a JSON object with an \"event\"); the file "
                            "is damaged there: delete that line and run opt-ds summary again")
    if not records:
        raise UserError(f"{path} holds no metrics records: the run stopped before logging anything; check its "
                        "console output, or pass the log_dir of a run that trained")
    return records, notes


def _numeric(record: dict, *keys) -> bool:
    return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


def summarize(records: list) -> list:
    lines = []
    evals = [r for r in records if r["event"] == "eval" and _numeric(r, "loss", "step")]
    trains = [r for r in records if r["event"] == "train" and _numeric(r, "loss", "step")]
    left_out = sum(r["event"] in ("eval", "train") for r in records) - len(evals) - len(trains)
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"validation loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
                     f"{last['step']} (perplexity {math.exp(first['loss']):.0f} -> {math.exp(last['loss']):.1f})")
    if trains:
        lines.append(f"training loss:   {trains[0]['loss']:.3f} at step {trains[0]['step']} -> {trains[-1]['loss']:.3f} "
                     f"at step {trains[-1]['step']}")
        speeds = sorted(r["tokens_per_second"] for r in trains if _numeric(r, "tokens_per_second"))
        tflops = sorted(r["model_tflops_per_gpu"] for r in trains if _numeric(r, "model_tflops_per_gpu"))
        if speeds and tflops:
            lines.append(f"throughput:      {speeds[len(speeds) // 2]:.0f} tokens/s, {tflops[len(tflops) // 2]:.4f} "
                         f"model TFLOP/s per process (medians over {len(speeds)} log lines)")
    checkpoints = [r for r in records if r["event"] == "checkpoint" and "path" in r]
    if checkpoints:
        lines.append(f"checkpoint:      {checkpoints[-1]['path']}")
    for sample in (r for r in records if r["event"] == "sample"):
        text = f"{sample.get('prompt') or ''}{sample.get('text') or ''}".strip("\n")
        lines.append(f"sample at step {sample['step']}:\n" + "\n".join(f"    {line}" for line in text.splitlines()))
    if left_out:
        lines.append(f"note: {left_out} train/eval record(s) without a numeric loss and step are left out")
    return lines


def run(args) -> int:
    path = Path(args.log_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the run's train.log_dir")
    records, notes = read_records(path)
    print("\n".join(summarize(records) + notes))
    return 0
