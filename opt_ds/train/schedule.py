"""The learning rate's one owner: linear warmup, then linear (OPT) or cosine decay to a floor, around a peak
that recovery may lower. Recovery and fault injection ask this object to change the LR; nothing else writes
the optimizer's param-group LRs or the scheduler's base LRs."""
from __future__ import annotations

import functools
import math

import torch


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


class LearningRateSchedule(torch.optim.lr_scheduler.LambdaLR):
    """DeepSpeed steps it after every update and saves its state dict (the base LRs included) in checkpoints."""

    def __init__(self, optimizer, *, warmup_steps: int, decay_steps: int, min_ratio: float, style: str):
        # a partial, as before, so the saved state dict is unchanged (LambdaLR saves a partial's __dict__)
        super().__init__(optimizer, functools.partial(lr_multiplier, warmup_steps=warmup_steps,
                                                      decay_steps=decay_steps, min_ratio=min_ratio, style=style))

    def set_peak(self, peak_lr: float) -> None:
        """Make `peak_lr` the peak of the schedule (e.g. optimizer.lr x the recoveries' cuts) from now on."""
        self.base_lrs = [peak_lr for _ in self.base_lrs]
        self.apply()

    def apply(self) -> None:
        """Give every parameter group the LR the schedule prescribes now; undoes a `scale_this_step`."""
        for group, base, multiplier in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * multiplier(self.last_epoch)

    def scale_this_step(self, factor: float) -> None:
        """Multiply the LR of the next update by `factor` (fault injection); `step` or `apply` ends it."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
