"""Training checkpoints: DeepSpeed's pipeline checkpoint files, published atomically.

Every rank writes into `<save_dir>/.tmp-<tag>/`; after a barrier rank 0 renames the folder to `<tag>` and
only then moves the `latest` pointer (write-to-temp + os.replace), so a crash at any moment leaves the
previous checkpoint and pointer intact. `client_state` carries what DeepSpeed does not know: the step,
the data position and the micro-batch counter that seeds dropout.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from opt_ds.errors import UserError

LATEST = "latest"
UNIVERSAL_LATEST = "latest_universal"     # written by `opt-ds convert --to universal`
RUN_STATE_KEY = "opt_ds"


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


def find_resume_point(save_dir, load_dir) -> Optional[ResumePoint]:
    """The run's own latest checkpoint (save_dir) if there is one, else load_dir's; None for a fresh start.
    Preferring save_dir makes a restarted run continue from its newest checkpoint, not from where it began."""
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
    saved = torch.load(states, map_location="cpu", weights_only=False)
    return ResumePoint(directory, tag, kind, {k: v for k, v in saved.items() if isinstance(k, str)})


def check_compatible(point: ResumePoint, shape, layout) -> None:
    """The checkpoint must hold this model, and a full checkpoint this layout (ZeRO partitions do not move)."""
    from opt_ds.parallel.checkpoint_info import MODEL_SHAPE_KEY
    stored = point.saved.get(MODEL_SHAPE_KEY)
    if stored is not None:
        wanted = dataclasses.asdict(shape)
        differs = [f"{k}: checkpoint {stored.get(k)!r}, config {v!r}" for k, v in wanted.items()
                   if k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size",
                            "max_position_embeddings", "word_embed_proj_dim", "pre_layer_norm")
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


def load(engine, point: ResumePoint) -> dict:
    """Collective: load the resume point into the engine (built with load_universal for a universal one)."""
    weights_only = point.kind == "weights"
    path, client_state = engine.load_checkpoint(
        str(point.directory), tag=point.tag, load_module_only=weights_only,
        load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.folder}")
    return client_state or {}
