"""The console lines of a run (rank 0): one readable line per record, and for training the line a
Megatron-LM or GPT-NeoX user looks for: progress, time, data consumed, loss over the interval, speed."""
from __future__ import annotations

import datetime

PREFIX = "[opt_ds]"


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def train_line(step: int, r: dict) -> str:
    """step 20/300 | 0:00:21 elapsed, ETA 0:05:02 | 40,960 tokens, 320 samples | loss 6.8123 (mean of 10 steps)
    | lr 2.000e-03 | grad norm 0.912 | 1,953 tokens/s | 0.0151 model TFLOP/s per GPU | memory 0.61 GiB"""
    width = len(str(r["steps_total"]))
    parts = [f"step {step:>{width}}/{r['steps_total']}",
             f"{duration(r['elapsed_seconds'])} elapsed, ETA {duration(r['eta_seconds'])}",
             f"{r['consumed_tokens']:,} tokens, {r['consumed_samples']:,} samples",
             f"loss {r['loss']:.4f} (mean of {r['loss_steps']} step{'s' if r['loss_steps'] != 1 else ''})",
             f"lr {r['lr']:.3e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    if r.get("loss_scale") is not None:
        parts.append(f"loss scale {r['loss_scale']:g}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    parts += [f"{r['tokens_per_second']:,.0f} tokens/s",
              f"{r['model_tflops_per_gpu']:.4g} model TFLOP/s per GPU",
              f"memory {r['peak_memory_gib']:.2f} GiB"]
    return f"{PREFIX} " + " | ".join(parts)


def line(event: str, step: int, fields: dict) -> str:
    if event == "train" and "steps_total" in fields:
        return train_line(step, fields)
    shown = " ".join(f"{k}={_format(v)}" for k, v in fields.items() if not isinstance(v, (dict, list)))
    return f"{PREFIX} {event} step={step} {shown}"
