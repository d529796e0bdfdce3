"""Checkpoint retention: keep the newest K, every M-th step, and always the newest healthy checkpoint.

The newest healthy checkpoint is what a divergence rolls back to, so it survives however many unhealthy
checkpoints come after it; the checkpoint `latest` names is never deleted either.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from opt_ds.train import checkpoint


def to_delete(checkpoints: list, *, keep_last: int, keep_every: int, protect=()) -> list:
    """Which of `checkpoints` (checkpoint.Published-like: .step, .tag, .healthy; oldest first) to delete."""
    if keep_last <= 0:
        return []
    ordered = sorted(checkpoints, key=lambda c: c.step)
    keep = {c.tag for c in ordered[-keep_last:]}
    keep |= {c.tag for c in ordered if keep_every and c.step % keep_every == 0}
    healthy = [c for c in ordered if c.healthy]
    if healthy:
        keep.add(healthy[-1].tag)
    keep |= set(protect)
    return [c for c in ordered if c.tag not in keep]


def prune(save_dir, *, keep_last: int, keep_every: int) -> list:
    """Rank 0 only: delete the checkpoints the policy does not keep; returns their tags."""
    save_dir = Path(save_dir)
    victims = to_delete(checkpoint.published(save_dir), keep_last=keep_last, keep_every=keep_every,
                        protect=[checkpoint.latest_tag(save_dir)])
    for ckpt in victims:
        doomed = ckpt.path.with_name(f".deleting-{ckpt.tag}")     # unpublished first: a crash mid-delete
        ckpt.path.rename(doomed)                                  # leaves no half-deleted global_stepN
        shutil.rmtree(doomed)
    return [c.tag for c in victims]
