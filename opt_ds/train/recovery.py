"""Divergence recovery, done by the run itself instead of by hand as OPT-175B's logbook records.

On a divergence every rank, in the same process and without a restart, reloads the newest checkpoint marked
healthy that still matches its manifest (`engine.load_checkpoint`), moves the data cursor past the window
consumed since that checkpoint, multiplies the peak LR by `recovery.lr_factor` (and sets
`recovery.clip_grad`), and carries on. These changes are run state, saved in every later checkpoint. After
`recovery.max_retries` rollbacks without reaching a new healthy checkpoint beyond the last divergence, the run
stops with exit status 3 and a message saying how to continue. Every event goes to metrics.jsonl and, for
people, to incidents.md. A suspected bad host (replica disagreement) is rolled back without LR cut or skip.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from opt_ds.errors import TrainingDiverged
from opt_ds.patches import set_forward_passes, set_gradient_clipping
from opt_ds.train import checkpoint, manifest
from opt_ds.train.collective import barrier, from_rank0
from opt_ds.train.contract import RunState
from opt_ds.train.incidents import IncidentLog


def apply_optimizer_settings(engine, run, state) -> None:
    """Peak LR = optimizer.lr x state.lr_scale, clipping = state.clip_grad (or optimizer.clip_grad). Applied
    after every load, because DeepSpeed restores the scheduler's base LRs and the optimizer's clip value from
    the checkpoint files; the config stays the source of truth (a lower optimizer.lr on resume takes effect)."""
    engine.lr_scheduler.set_peak(run.optimizer.lr * state.lr_scale)
    clip = state.clip_grad if state.clip_grad is not None else run.optimizer.clip_grad
    set_gradient_clipping(engine, clip)


def incident_path(train) -> Optional[Path]:
    where = train.log_dir or train.save_dir
    return Path(where) / "incidents.md" if where else None


class Recovery:
    """Decides what a divergence leads to: a rollback (the new run state) or giving up (TrainingDiverged)."""

    def __init__(self, run, engine, metrics, incidents: IncidentLog, *, rank: int):
        self.run, self.engine, self.metrics, self.incidents, self.rank = run, engine, metrics, incidents, rank

    def recover(self, state, verdict):
        """Collective: the run state rolled back to the last healthy checkpoint, which is loaded into the
        engine; or TrainingDiverged."""
        rec, train = self.run.recovery, self.run.train
        self.metrics.log("divergence", state.step, anomalies=verdict.anomalies, data_step=state.data_step)
        reason = None
        if not rec.enabled:
            reason = "automatic recovery is off (recovery.enabled=false)"
        elif not train.save_dir:
            reason = "there is no train.save_dir to roll back to"
        elif state.retries >= rec.max_retries:
            reason = (f"the retry budget is spent: {state.retries} rollback(s) without a new healthy checkpoint past "
                      f"the last divergence (recovery.max_retries={rec.max_retries})")
        target = None if reason else self._rollback_target(state.step)
        if reason is None and target is None:
            reason = f"no checkpoint in {train.save_dir} older than step {state.step} is marked healthy and intact"
        if reason is not None:
            self._give_up(state.step, verdict, reason)
        return self._roll_back(state, verdict, target)

    def _rollback_target(self, step: int):
        save_dir = Path(self.run.train.save_dir)
        tags = from_rank0(lambda: [c.tag for c in reversed(checkpoint.published(save_dir))
                                   if c.step < step and c.healthy])
        for tag in tags:
            problems = manifest.verify(save_dir / tag, self.run.checkpoint.verify)
            if not problems:
                return checkpoint.find(save_dir, tag)
            self.metrics.log("damaged_checkpoint", step, checkpoint=tag, problems=problems)
            self.incidents.write(f"step {step}: {tag} is damaged, not used for the rollback", problems)
            if self.rank == 0:
                print(f"[opt_ds] WARNING: {tag} is damaged ({problems[0]}); trying an older checkpoint", flush=True)
        return None

    def _roll_back(self, before, verdict, target):
        rec, run = self.run.recovery, self.run
        detected = before.step
        point = checkpoint.describe(Path(run.train.save_dir), target.tag)
        checkpoint.load(self.engine, point, verify="none")             # just verified
        restored = RunState.from_saved(point.run_state)
        optimization = not verdict.hardware_only
        skip = optimization and rec.skip_data
        lr_factor = rec.lr_factor if optimization else 1.0
        new_clip = rec.clip_grad if (optimization and rec.clip_grad is not None) else before.clip_grad
        after = dataclasses.replace(
            restored, data_offset=before.data_offset + (detected - restored.step if skip else 0),
            lr_scale=before.lr_scale * lr_factor, clip_grad=new_clip, retries=before.retries + 1,
            recoveries=before.recoveries + 1, diverged_at=detected)
        set_forward_passes(self.engine, after.micro_offset)
        apply_optimizer_settings(self.engine, run, after)
        if self.rank == 0:
            checkpoint.set_aside_newer(run.train.save_dir, restored.step)
            checkpoint.point_latest(run.train.save_dir, target.tag)
        barrier()
        self._report_rollback(verdict, target, before, after, skip, lr_factor)
        return after

    def _report_rollback(self, verdict, target, before, after, skip: bool, lr_factor: float) -> None:
        run = self.run
        detected = before.step
        batch = run.batch.global_batch_size
        peak_before, peak_after = run.optimizer.lr * before.lr_scale, run.optimizer.lr * after.lr_scale
        clip_before = before.clip_grad if before.clip_grad is not None else run.optimizer.clip_grad
        clip_after = after.clip_grad if after.clip_grad is not None else run.optimizer.clip_grad
        first, last = target.step + before.data_offset, detected + before.data_offset     # 0-based data steps
        health = (target.manifest or {}).get("health") or {}
        window = (f"skipped the data of steps {first + 1}–{last} of the data order (samples {first * batch}–"
                  f"{last * batch - 1}); step {target.step + 1} now reads the batch of data step "
                  f"{after.data_step + 1}" if skip else "data not skipped (suspected hardware: replaying it)")
        lines = [
            f"detected at step {detected}: {verdict.summary()}",
            f"restored {target.tag} (marked healthy; recent loss median {_fmt(health.get('loss_median'))}, loss scale "
            f"{_fmt(health.get('loss_scale'))})",
            window,
            f"peak learning rate {peak_before:.4g} → {peak_after:.4g} (x{lr_factor:g}; x{after.lr_scale:.4g} of "
            f"optimizer.lr in all); gradient clipping {clip_before:g} → {clip_after:g}",
            f"retry {after.retries} of recovery.max_retries={run.recovery.max_retries} "
            f"({after.recoveries} rollback(s) in this run)",
        ]
        kinds = ", ".join(sorted({a["kind"] for a in verdict.anomalies if a["fatal"]}))
        self.incidents.write(f"step {detected}: {kinds} → rolled back to {target.tag}", lines)
        self.metrics.log("recovery", detected, restored=target.tag, restored_step=target.step,
                         skipped_data_steps=[first + 1, last] if skip else None, data_step=after.data_step,
                         peak_lr=peak_after, lr_scale=after.lr_scale, clip_grad=clip_after, retries=after.retries,
                         anomalies=verdict.anomalies)
        if self.rank == 0:
            print(f"[opt_ds] DIVERGENCE at step {detected} ({verdict.summary()}): rolled back to {target.tag}, "
                  f"peak LR {peak_after:.4g}, clip {clip_after:g}", flush=True)

    def _give_up(self, step: int, verdict, reason: str) -> None:
        train = self.run.train
        healthy = from_rank0(lambda: [c.tag for c in checkpoint.published(train.save_dir) if c.healthy]
                             if train.save_dir else [])
        if healthy:
            fix = (f"to continue by hand, resume from the last healthy checkpoint {healthy[-1]} with "
                   f"train.load_tag={healthy[-1]} and a lower optimizer.lr")
        elif train.save_dir:
            fix = (f"no checkpoint in {train.save_dir} is marked healthy: restart with a lower optimizer.lr (and a "
                   "train.save_interval that saves before the divergence)")
        else:
            fix = "set train.save_dir and train.save_interval so there is a checkpoint to roll back to"
        where = incident_path(train)
        self.incidents.write(f"step {step}: gave up", [f"detected: {verdict.summary()}", f"not recovered: {reason}",
                                                     fix])
        self.metrics.log("gave_up", step, reason=reason, anomalies=verdict.anomalies)
        self.metrics.close()
        raise TrainingDiverged(f"training diverged at step {step} ({verdict.summary()}); {reason}. "
                               f"{fix[0].upper() + fix[1:]}" + (f". Incident log: {where}" if where else ""))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"
