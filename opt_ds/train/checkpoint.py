"""Training checkpoints: DeepSpeed's pipeline checkpoint files, published atomically.

Every rank writes into `<save_dir>/.tmp-<tag>/`; after a barrier the ranks hash the files and rank 0 writes
`manifest.json` (sizes, SHA-256, health) last, renames the folder to `<tag>` and only then moves the `latest`
pointer (write-to-temp + os.replace), so a crash at any moment leaves the previous checkpoint and pointer
intact. Loading checks the files against the manifest first. `client_state` carries what DeepSpeed does not
know: the step, the data position and the micro-batch counter that seeds dropout.
"""
from __future__ import annotations

import dataclasses
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
UNIVERSAL_LATEST = "latest_universal"     # written by `opt-ds convert --to universal`
RUN_STATE_KEY = "opt_ds"
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


@dataclass
class ResumePoint:
    """A checkpoint to resume from and what kind it is:
    full      written by `opt-ds train` at this layout: weights, ZeRO optimizer state, LR schedule, run state;
    universal `opt-ds convert --to universal`: all of that, loadable at any TP x PP x DP;
    weights   `opt-ds convert --to opt_ds`: weights only (optimizer and schedule start afresh)."""
    directory: Path
    tag: str
    kind: str
    saved: dict             # the client state stored in mp_rank_00_model_states.pt

    @property
    def folder(self) -> Path:
        return self.directory / self.tag

    @property
    def run_state(self) -> Optional[dict]:
        return self.saved.get(RUN_STATE_KEY)


def find_resume_point(save_dir, load_dir, tag: Optional[str] = None) -> Optional[ResumePoint]:
    """The run's own latest checkpoint (save_dir) if there is one, else load_dir's; None for a fresh start.
    Preferring save_dir makes a restarted run continue from its newest checkpoint, not from where it began.
    `tag` (train.load_tag) names another checkpoint than the latest, looked up in save_dir, then load_dir."""
    if tag is not None:
        for directory in (save_dir, load_dir):
            if directory is not None and (Path(directory) / tag).is_dir():
                return describe(Path(directory), tag)
        where = " or ".join(str(d) for d in (save_dir, load_dir) if d is not None) or "no train.save_dir/load_dir"
        raise CheckpointError(f"train.load_tag={tag}: there is no folder {tag} in {where}; name one of the "
                              "global_step* folders there")
    for directory in (save_dir, load_dir):
        if directory is not None and (latest_tag(directory) or _universal_tag(directory)):
            return describe(Path(directory))
    if load_dir is not None:
        raise CheckpointError(f"train.load_dir={load_dir} holds no checkpoint (no '{LATEST}' or "
                              f"'{UNIVERSAL_LATEST}' file); fix the path or drop train.load_dir to start from scratch")
    return None


def _universal_tag(directory) -> Optional[str]:
    pointer = Path(directory) / UNIVERSAL_LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def describe(directory: Path, tag: Optional[str] = None) -> ResumePoint:
    """What the checkpoint `tag` (default: the one the latest pointer names) in `directory` holds."""
    import torch
    universal = _universal_tag(directory)
    if tag is None and universal is not None:
        tag, kind = universal, "universal"
    else:
        tag = tag or latest_tag(directory)
        kind = "full" if any((directory / str(tag)).glob("*zero_pp_rank_*_optim_states.pt")) else "weights"
    states = directory / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"checkpoint {directory / tag} is incomplete: {states.name} is missing; resume from "
                              "an earlier global_step* folder (write its name into 'latest')")
    problems = manifest.verify(directory / tag, "size")     # sizes only: no process group exists yet
    if problems:
        raise damaged_error(directory, tag, problems, "size")
    try:
        saved = torch.load(states, map_location="cpu", weights_only=False)
    except Exception as err:                # a damaged file must not surface as a pickle traceback
        raise damaged_error(directory, tag, [f"{states.name}: unreadable ({type(err).__name__}: {err})"],
                            "size") from None
    return ResumePoint(directory, tag, kind, {k: v for k, v in saved.items() if isinstance(k, str)})


def check_compatible(point: ResumePoint, shape, layout) -> None:
    """The checkpoint must hold this model, and a full checkpoint this layout (ZeRO partitions do not move)."""
    from opt_ds.models.family import family_of
    from opt_ds.parallel.checkpoint_info import MODEL_FAMILY_KEY, MODEL_SHAPE_KEY
    stored = point.saved.get(MODEL_SHAPE_KEY)
    if stored is not None:
        stored_family, family = point.saved.get(MODEL_FAMILY_KEY, "opt"), family_of(shape).name
        if stored_family != family:
            raise CheckpointError(f"{point.folder} holds a {stored_family} model and this config builds a {family} "
                                  f"model; set model.family={stored_family} (or its preset) to load it")
        wanted = dataclasses.asdict(shape)
        differs = [f"{k}: checkpoint {stored.get(k)!r}, config {v!r}" for k, v in wanted.items()
                   if k not in ("dropout", "attention_dropout", "init_std", "layer_norm_eps")
                   and stored.get(k) != v]
        if differs:
            raise CheckpointError(f"{point.folder} holds another model ({'; '.join(differs)}); use the model config "
                                  "it was trained with")
    run_state = point.run_state
    if point.kind == "full" and run_state is not None:
        saved_layout = tuple(run_state["layout"][k] for k in ("tensor", "pipeline", "data"))
        if saved_layout != (layout.tensor, layout.pipeline, layout.data):
            tp, pp, dp = saved_layout
            raise CheckpointError(
                f"{point.folder} was saved at TP={tp} x PP={pp} x DP={dp}, this run is {layout}; ZeRO optimizer "
                f"state only loads at the layout that wrote it. Convert it once with `opt-ds convert "
                f"{point.directory} {point.directory}-universal --to universal` and set "
                f"train.load_dir={point.directory}-universal (keeps the optimizer), or `--to opt_ds --tp "
                f"{layout.tensor} --pp {layout.pipeline}` (weights only)")


def load(engine, point: ResumePoint, verify: str = "sha256") -> dict:
    """Collective: check the resume point against its manifest (`verify`: sha256 | size | none, the ranks
    sharing the reading), then load it into the engine (built with load_universal for a universal one)."""
    problems = manifest.verify(point.folder, verify)
    if problems:
        raise damaged_error(point.directory, point.tag, problems, verify)
    if problems is None and dist.get_rank() == 0:
        print(f"[opt_ds] warning: {point.folder} has no {manifest.MANIFEST}; its files cannot be checked before "
              "loading", flush=True)
    weights_only = point.kind == "weights"
    path, client_state = engine.load_checkpoint(
        str(point.directory), tag=point.tag, load_module_only=weights_only,
        load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.folder}")
    return client_state or {}
