"""The run configs shipped in ds_configs/: each named model's paper recipe (batch, learning rate, schedule,
layout) is its ds_configs/<name>.yaml, and only there (opt_ds.models.presets hold the architecture)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def shipped_config(name: str) -> Optional[Path]:
    """ds_configs/<name>.yaml of a checkout (or an editable install); None when there is none."""
    path = SHIPPED_CONFIGS / f"{name}.yaml"
    return path if path.is_file() else None


def recipe_batch_tokens(name: str) -> Optional[int]:
    """Tokens per optimizer step of the named model's shipped recipe; None when none is shipped."""
    from opt_ds.config.loading import load_config
    path = shipped_config(name)
    if path is None:
        return None
    batch = load_config(path).run.batch
    return batch.global_batch_size * batch.seq_length
