"""Learning-rate schedules: linear warmup, then linear (OPT) or cosine decay to a floor."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, warmup_steps: int, decay_steps: int, min_ratio: float, style: str) -> float:
    """Fraction of the peak LR at optimizer step `step` (0-based: the LR used by the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if style == "constant":
        return 1.0
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if style == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if style == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {style!r}")
