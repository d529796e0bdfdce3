"""Training checkpoints: DeepSpeed's pipeline checkpoint files, published atomically.

Every rank writes into `<save_dir>/.tmp-<tag>/`; after a barrier the ranks hash the files and rank 0 writes
`manifest.json` (sizes, SHA-256, health) last, renames the folder to `<tag>` and only then moves the `latest`
pointer (write-to-temp + os.replace), so a crash at any moment leaves the previous checkpoint and pointer
intact. Re-saving a step that is already published renames the old copy aside (`.replaced-<tag>`) first and
deletes it only once the new copy is in place, so there is always one complete copy; a start-up after a crash
puts whichever complete copy it finds back (`recover_interrupted_publish`). Loading checks the files against
the manifest first. `client_state` carries what DeepSpeed does not know: the step, the data position and the
micro-batch counter that seeds dropout.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from opt_ds.errors import UserError
from opt_ds.train import manifest
from opt_ds.train.collective import barrier, from_rank0, rank_and_world
from opt_ds.durable import fsync, write_atomically
from opt_ds.train.contract import ENGINE_STATES, MODEL_FAMILY_KEY, MODEL_SHAPE_KEY, RUN_STATE_KEY, saved_layout

LATEST = "latest"
UNIVERSAL_LATEST = "latest_universal"     # written by `opt-ds convert --to universal`
ABANDONED = "abandoned"
STAGING = ".tmp-"           # + tag: a checkpoint being written
REPLACED = ".replaced-"     # + tag: the published copy of a step being re-saved, until the new one is in place
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


def unreadable_latest(directory) -> Optional[str]:
    """Why the `latest` pointer of a save folder names no checkpoint there (missing, empty, unreadable, or a
    folder that does not exist), or None when it names one."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return f"there is no '{LATEST}' file"
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"'{LATEST}' is unreadable ({type(err).__name__})"
    if not tag:
        return f"'{LATEST}' is empty"
    if not (Path(directory) / tag).is_dir():
        return f"'{LATEST}' names {tag[:80]!r}, which is not a folder there"
    return None


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


def save(engine, save_dir, step: int, client_state: dict, health: Optional[dict] = None,
         in_publish_gap: Optional[Callable[[], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder. `health` goes into the
    manifest (see opt_ds.train.recovery). `in_publish_gap` (fault injection) runs on rank 0 between setting
    an existing copy of this step aside and renaming the new one into place."""
    save_dir = Path(save_dir)
    tag = step_tag(step)
    staging = save_dir / f"{STAGING}{tag}"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)    # left by a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(str(save_dir), tag=staging.name, client_state=client_state, save_latest=False)
    dist.barrier()
    manifest.write(staging, tag=tag, step=step, health=health)
    final = save_dir / tag
    if dist.get_rank() == 0:
        _publish(staging, final, in_publish_gap)
        point_latest(save_dir, tag)
        shutil.rmtree(save_dir / f"{REPLACED}{tag}", ignore_errors=True)
    dist.barrier()
    return final


def _publish(staging: Path, final: Path, in_gap: Optional[Callable[[], None]]) -> None:
    """Rank 0: rename a complete staging folder to its published name. A published copy of the same step
    (re-saving a step, e.g. a stop signal right after an interval save) is renamed aside first, never deleted before the new one
    is in place: at every moment one complete copy exists under a name start-up recovery knows."""
    replaced = final.with_name(f"{REPLACED}{final.name}")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)   # from an earlier re-save whose new copy was published
        os.rename(final, replaced)
        fsync(final.parent)
        if in_gap is not None:
            in_gap()
    os.rename(staging, final)
    fsync(final.parent)


def recover_interrupted_publish(save_dir, verify: str) -> list:
    """Collective, at start-up (under the save folder's lock, before the resume point is chosen): finish what
    a crash during `save` left. For a step with no published folder, a complete staging copy (its manifest
    present and its files matching, `verify`: sha256 | size | none) is renamed into place, else the copy a
    re-save had set aside is put back; a set-aside copy whose replacement was published is deleted. An
    incomplete staging folder is left for the next save to remove. Returns what was done, one line each."""
    save_dir = Path(save_dir)
    names = set(from_rank0(lambda: [p.name for p in save_dir.iterdir() if p.is_dir()] if save_dir.is_dir() else []))
    tags = sorted({name[len(prefix):] for name in names for prefix in (STAGING, REPLACED)
                   if name.startswith(prefix) and _TAG.match(name[len(prefix):])})
    done = []                       # (folder, new name or None to delete, what the log says)
    for tag in tags:
        staging, replaced = save_dir / f"{STAGING}{tag}", save_dir / f"{REPLACED}{tag}"
        has_replaced = replaced.name in names
        if tag not in names:
            if staging.name in names and manifest.verify(staging, verify) == []:      # collective
                done.append((staging, save_dir / tag, f"restored {tag} from {staging.name}, its complete copy "
                                                      "(the save was interrupted before it was published)"))
            elif has_replaced:
                done.append((replaced, save_dir / tag, f"restored {tag} from {replaced.name}, the copy a "
                                                       "re-save had set aside (the re-save was interrupted)"))
                continue
            else:
                continue            # an incomplete staging folder only: the next save removes it
        if has_replaced:
            done.append((replaced, None, f"deleted {replaced.name}: a newer complete copy of {tag} is in place"))
    if rank_and_world()[0] == 0:
        for folder, target, line in done:
            if target is None:
                shutil.rmtree(folder)
            else:
                os.rename(folder, target)
                fsync(save_dir)
            print(f"[opt_ds] {save_dir}: {line}", flush=True)
    barrier()
    return [line for _, _, line in done]


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
    saved: dict             # the client state stored in contract.ENGINE_STATES

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
        if directory is None:
            continue
        if _universal_tag(directory) is None and (published(directory) or (Path(directory) / LATEST).exists()):
            reason = unreadable_latest(directory)
            if reason is not None:
                raise no_latest_error(Path(directory), reason)
        if latest_tag(directory) or _universal_tag(directory):
            return describe(Path(directory))
    if load_dir is not None:
        raise CheckpointError(f"train.load_dir={load_dir} holds no checkpoint (no '{LATEST}' or "
                              f"'{UNIVERSAL_LATEST}' file); fix the path or drop train.load_dir to start from scratch")
    return None


def no_latest_error(directory: Path, reason: str) -> CheckpointError:
    """Collective (it verifies the checkpoints): a folder with checkpoints whose `latest` names none of them.
    Never a silent fresh start, which would set every checkpoint there aside."""
    checkpoints = published(directory)
    newest = next((c for c in reversed(checkpoints) if manifest.verify(c.path, "size") == []), None)
    if newest is not None:
        fix = (f"the newest intact checkpoint there is {newest.tag}: resume from it with train.load_tag={newest.tag} "
               f"(or write {newest.tag} into {directory / LATEST})")
    else:
        fix = ("no global_step* folder there matches its manifest: restore one from a copy, or start from scratch "
               "with another train.save_dir")
    what = f"{directory} holds checkpoints but" if checkpoints else f"{directory}:"
    return CheckpointError(f"{what} {reason}; {fix}. Nothing was changed")


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
    states = directory / tag / ENGINE_STATES
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
        saved = saved_layout(run_state)
        if saved != (layout.tensor, layout.pipeline, layout.data):
            tp, pp, dp = saved
            raise CheckpointError(
                f"{point.folder} was saved at TP={tp} x PP={pp} x DP={dp}, this run is {layout}; ZeRO optimizer "
                f"state only loads at the layout that wrote it. Convert it once with `opt-ds convert "
                f"{point.directory} {point.directory}-universal --to universal` and train with "
                f"train.load_dir={point.directory}-universal train.save_dir={point.directory}-tp{layout.tensor}"
                f"pp{layout.pipeline} (keeps the optimizer; a new save_dir, since a run resumes from its own "
                f"save_dir first), or `--to opt_ds --tp {layout.tensor} --pp {layout.pipeline}` (weights only)")


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
