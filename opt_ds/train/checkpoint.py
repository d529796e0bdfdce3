"""Training checkpoints: DeepSpeed's pipeline checkpoint files, published atomically.

Every rank writes into `<save_dir>/.tmp-<tag>/`; after a barrier rank 0 renames the folder to `<tag>` and
only then moves the `latest` pointer (write-to-temp + os.replace), so a crash at any moment leaves the
previous checkpoint and pointer intact. `client_state` carries what DeepSpeed does not know: the step,
the data position and the micro-batch counter that seeds dropout.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from opt_ds.errors import UserError

LATEST = "latest"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


def step_tag(step: int) -> str:
    return f"global_step{step}"


def latest_tag(directory) -> Optional[str]:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag or None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, save_dir, step: int, client_state: dict) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder."""
    save_dir = Path(save_dir)
    tag = step_tag(step)
    staging = f".tmp-{tag}"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(save_dir / staging, ignore_errors=True)    # left by a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(str(save_dir), tag=staging, client_state=client_state, save_latest=False)
    dist.barrier()
    final = save_dir / tag
    if dist.get_rank() == 0:
        if final.exists():                                          # re-saving a step, e.g. after a rollback
            shutil.rmtree(final)
        os.rename(save_dir / staging, final)
        _write_atomically(save_dir / LATEST, tag)
    dist.barrier()
    return final


def load(engine, load_dir, tag: Optional[str] = None, *, module_only: bool = False) -> dict:
    """Collective: load `tag` (default: the `latest` pointer) into the engine; returns the client state."""
    tag = tag or latest_tag(load_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {load_dir}: it has no '{LATEST}' file; pass the folder a run "
                              "saved into (train.save_dir) or a tag")
    if not (Path(load_dir) / tag).is_dir():
        raise CheckpointError(f"checkpoint {Path(load_dir) / tag} does not exist; '{LATEST}' in {load_dir} names a "
                              "missing folder — point it at an existing global_step* folder")
    path, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_module_only=module_only,
        load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(load_dir) / tag}")
    return client_state or {}
