"""Training checkpoints: DeepSpeed's pipeline checkpoint files, published atomically.

Every rank writes into `<save_dir>/.tmp-<tag>/`; after a barrier the ranks hash the files and rank 0 writes
`manifest.json` (sizes, SHA-256, health) last, renames the folder to `<tag>` and only then moves the `latest`
pointer (write-to-temp + os.replace), so a crash at any moment leaves the previous checkpoint and pointer
intact. Loading checks the files against the manifest first. `client_state` carries what DeepSpeed does not
know: the step, the data position and the micro-batch counter that seeds dropout.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from opt_ds.errors import UserError
from opt_ds.train import manifest
from opt_ds.train.durable import fsync, write_atomically

LATEST = "latest"
ABANDONED = "abandoned"
_TAG = re.compile(r"^global_step(\d+)$")


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


@dataclass(frozen=True)
class Published:
    """A published checkpoint folder `global_stepN` and what its manifest says about it."""
    step: int
    path: Path

    @property
    def tag(self) -> str:
        return self.path.name

    @cached_property
    def manifest(self) -> Optional[dict]:
        return manifest.read(self.path)

    @property
    def healthy(self) -> bool:
        """Marked healthy when it was saved; a checkpoint without a manifest is of unknown health."""
        return bool(((self.manifest or {}).get("health") or {}).get("healthy"))


def published(directory) -> list:
    """The published checkpoints of a save folder, oldest first (staging `.tmp-*` folders excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [Published(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, key=lambda c: c.step)


def find(directory, tag: str) -> Published:
    return next(c for c in published(directory) if c.tag == tag)


def point_latest(save_dir, tag: str) -> None:
    """Rank 0 only: make `latest` name `tag` (atomically)."""
    write_atomically(Path(save_dir) / LATEST, tag)


def set_aside_newer(save_dir, step: int) -> list:
    """Rank 0 only: move published checkpoints newer than `step` into `<save_dir>/abandoned/` (never deleted:
    they belong to a trajectory that was rolled back or resumed past), so every checkpoint left in the save
    folder lies on the run's current trajectory. Returns the tags moved."""
    moved = []
    for ckpt in published(save_dir):
        if ckpt.step > step:
            target = Path(save_dir) / ABANDONED / ckpt.tag
            suffix = 1
            while target.exists():
                target, suffix = Path(save_dir) / ABANDONED / f"{ckpt.tag}.{suffix}", suffix + 1
            target.parent.mkdir(exist_ok=True)
            os.rename(ckpt.path, target)
            moved.append(ckpt.tag)
    return moved


def save(engine, save_dir, step: int, client_state: dict, health: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder. `health` goes into the
    manifest (see opt_ds.train.recovery)."""
    save_dir = Path(save_dir)
    tag = step_tag(step)
    staging = f".tmp-{tag}"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(save_dir / staging, ignore_errors=True)    # left by a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(str(save_dir), tag=staging, client_state=client_state, save_latest=False)
    dist.barrier()
    manifest.write(save_dir / staging, tag=tag, step=step, health=health)
    final = save_dir / tag
    if dist.get_rank() == 0:
        if final.exists():                                          # re-saving a step, e.g. after a rollback
            shutil.rmtree(final)
        os.rename(save_dir / staging, final)
        fsync(save_dir)
        point_latest(save_dir, tag)
    dist.barrier()
    return final


def previous_intact(directory, before_step: int, mode: str) -> Optional[Published]:
    """Collective: the newest healthy checkpoint older than `before_step` whose files match its manifest."""
    for ckpt in reversed(published(directory)):
        if ckpt.step < before_step and ckpt.healthy and manifest.verify(ckpt.path, mode) == []:
            return ckpt
    return None


def damaged_error(load_dir, tag: str, problems: list, mode: str) -> CheckpointError:
    """Collective (it verifies the older checkpoints): the error for a damaged checkpoint, naming the file,
    the previous healthy checkpoint and the override that resumes from it."""
    load_dir = Path(load_dir)
    detail = problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
    match = _TAG.match(tag)
    previous = previous_intact(load_dir, int(match.group(1)), mode) if match else None
    if previous is not None:
        fix = (f"the previous healthy checkpoint is {previous.tag}: resume with train.load_tag={previous.tag} "
               f"(newer checkpoints are then moved to {load_dir / ABANDONED})")
    else:
        fix = (f"no older healthy checkpoint in {load_dir} matches its manifest: restore {tag} from a copy, or "
               f"start from scratch with another train.save_dir")
    return CheckpointError(f"{load_dir / tag} is damaged ({detail}); {fix}")


def load(engine, load_dir, tag: Optional[str] = None, *, module_only: bool = False,
         verify: str = "sha256") -> dict:
    """Collective: check `tag` (default: the `latest` pointer) against its manifest, then load it into the
    engine; returns the client state. `verify`: sha256 | size | none (see opt_ds.train.manifest)."""
    tag = tag or latest_tag(load_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {load_dir}: it has no '{LATEST}' file; pass the folder a run "
                              "saved into (train.save_dir) or a tag")
    if not (Path(load_dir) / tag).is_dir():
        raise CheckpointError(f"checkpoint {Path(load_dir) / tag} does not exist; '{LATEST}' in {load_dir} names a "
                              "missing folder — point it at an existing global_step* folder")
    problems = manifest.verify(Path(load_dir) / tag, verify)
    if problems:
        raise damaged_error(load_dir, tag, problems, verify)
    if problems is None and dist.get_rank() == 0:
        print(f"[opt_ds] warning: {Path(load_dir) / tag} has no {manifest.MANIFEST}; its files cannot be checked "
              "before loading", flush=True)
    path, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_module_only=module_only,
        load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(load_dir) / tag}")
    return client_state or {}
