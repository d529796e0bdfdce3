"""Divergence recovery, done by the run itself instead of by hand as OPT-175B's logbook records.

After every step all ranks agree on one verdict (opt_ds.train.collective.any_rank): healthy, stop requested,
or diverged. On a divergence every rank, in the same process and without a restart, reloads the newest
checkpoint marked healthy that still matches its manifest (`engine.load_checkpoint`), moves the data cursor
past the window consumed since that checkpoint, multiplies the peak LR by `recovery.lr_factor` (and sets
`recovery.clip_grad`), and carries on. These changes are run state, saved in every later checkpoint. After
`recovery.max_retries` rollbacks without reaching a new healthy checkpoint beyond the last divergence, the run
stops with exit status 3 and a message saying how to continue. Every event goes to metrics.jsonl and, for
people, to incidents.md. A suspected bad host (replica disagreement) is rolled back without LR cut or skip.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opt_ds.errors import TrainingDiverged
from opt_ds.train import checkpoint, manifest, retention, signals
from opt_ds.train.collective import all_gather_objects, any_rank, barrier, from_rank0
from opt_ds.train.health import HealthMonitor, ReplicaNormProbe, StepObservation
from opt_ds.train.incidents import IncidentLog


@dataclass
class Verdict:
    step: int
    anomalies: list             # dicts (kind, message, fatal, hardware), merged over the ranks
    diverged: bool
    hardware_only: bool         # every fatal anomaly points at a host, none at the optimization
    stop: Optional[str]         # the signal that asked for a stop, on whichever rank it arrived

    def summary(self) -> str:
        return "; ".join(a["message"] for a in self.anomalies if a["fatal"]) or "none"


def set_scheduled_lr(engine) -> None:
    """Give every parameter group the LR its schedule prescribes now (base LR x multiplier)."""
    scheduler = engine.lr_scheduler
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)


def apply_optimizer_settings(engine, run, state) -> None:
    """Peak LR = optimizer.lr x state.lr_scale, clipping = state.clip_grad (or optimizer.clip_grad). Applied
    after every load, because DeepSpeed restores the scheduler's base LRs and the optimizer's clip value from
    the checkpoint files; the config stays the source of truth (a lower optimizer.lr on resume takes effect)."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [run.optimizer.lr * state.lr_scale for _ in scheduler.base_lrs]
    set_scheduled_lr(engine)
    clip = state.clip_grad if state.clip_grad is not None else run.optimizer.clip_grad
    engine._config.gradient_clipping = clip
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = clip


def incident_path(train) -> Optional[Path]:
    where = train.log_dir or train.save_dir
    return Path(where) / "incidents.md" if where else None


class Supervisor:
    """Owns health, recovery, the graceful stop and fault injection for one Trainer."""

    def __init__(self, trainer):
        self.trainer = trainer
        run = self.run = trainer.cfg.run
        engine = trainer.engine
        probe_on = run.health.enabled and run.health.replica_check and trainer.cfg.data > 1
        self.probe = ReplicaNormProbe(engine) if probe_on else None
        self.monitor = HealthMonitor(run.health, fp16=run.precision.dtype == "fp16",
                                     deepspeed_min_loss_scale=run.precision.min_loss_scale,
                                     replica_names=self.probe.names() if self.probe else None)
        self.signals = signals.StopSignals(trainer.rank)
        self.incidents = IncidentLog(incident_path(run.train), enabled=trainer.rank == 0)
        self.unhealthy_since_save: list = []
        self._skipped_before = 0
        self.faults = None
        if run.faults.armed():
            from opt_ds.train.faults import FaultInjector
            self.faults = FaultInjector(trainer)        # after the probe: its gradient hook must run first

    # --- start ---------------------------------------------------------------------------------

    def start(self, resumed) -> None:
        """After the engine is built and any resume (a checkpoint.ResumePoint) is loaded: restore the health
        state, re-apply the LR and clipping of the run state, and make the save folder hold this run's
        trajectory only (rollback picks from it): checkpoints not behind the resumed one go to abandoned/."""
        t, train = self.trainer, self.run.train
        self.monitor.load_state_dict(t.state.health)
        apply_optimizer_settings(t.engine, self.run, t.state)
        if t.rank == 0 and train.save_dir:
            signals.clear_marker(train.save_dir)
            resumed_here = resumed is not None and resumed.directory.resolve() == Path(train.save_dir).resolve()
            moved = checkpoint.set_aside_newer(train.save_dir, t.state.step if resumed_here else -1)
            if resumed_here and checkpoint.latest_tag(train.save_dir) != resumed.tag:
                checkpoint.point_latest(train.save_dir, resumed.tag)
            if moved:
                origin = f"resumed from {resumed.folder}" if resumed else "started from scratch"
                print(f"[opt_ds] WARNING: {origin}: the checkpoints {', '.join(moved)} in {train.save_dir} belong "
                      f"to another trajectory and were moved to {Path(train.save_dir) / checkpoint.ABANDONED}",
                      flush=True)
                t.metrics.log("abandoned", t.state.step, checkpoints=moved)
        if self.faults is not None:
            self.faults.announce()
        barrier()

    # --- every step ----------------------------------------------------------------------------

    def before_step(self) -> None:
        self._skipped_before = self.trainer.engine.skipped_steps
        if self.faults is not None:
            self.faults.before_step(self.trainer.state)

    def after_step(self, record: dict) -> Verdict:
        """Collective: judge the step that just ran; every rank returns the same verdict."""
        t = self.trainer
        if self.faults is not None:
            self.faults.after_step()
        replica_norms = self.probe.take() if self.probe else None
        observation = StepObservation(step=t.state.step, loss=record["loss"], grad_norm=record["grad_norm"],
                                      loss_scale=record.get("loss_scale"),
                                      overflow=t.engine.skipped_steps > self._skipped_before,
                                      replica_norms=replica_norms)
        bar = self.monitor.bar()            # the bar this step was judged against
        local = self.monitor.observe(observation)
        if bar is not None:
            record["spike_threshold"] = bar.threshold
        record["clip_grad"] = float(getattr(t.engine.optimizer, "clip_grad", t.engine.gradient_clipping()))
        if replica_norms and min(replica_norms) > 0 and math.isfinite(max(replica_norms)):
            record["replica_norm_spread"] = max(replica_norms) / min(replica_norms)   # vs health.replica_norm_ratio
        fatal, optimization, stop, noted = any_rank([
            any(a.fatal for a in local), any(a.fatal and not a.hardware for a in local),
            self.signals.received is not None, bool(local)])
        anomalies = self._merge(local) if noted else []
        stop_signal = None
        if stop:
            names = [n for n in all_gather_objects(self.signals.received) if n]
            stop_signal = names[0]
        if anomalies and not fatal:
            t.metrics.log("anomaly", t.state.step, anomalies=anomalies)
            self.unhealthy_since_save += [a["message"] for a in anomalies]
        return Verdict(t.state.step, anomalies, fatal, fatal and not optimization, stop_signal)

    @staticmethod
    def _merge(local: list) -> list:
        merged, seen = [], set()
        for part in all_gather_objects([a.to_dict() for a in local]):
            for anomaly in part:
                key = (anomaly["kind"], anomaly["message"])
                if key not in seen:
                    seen.add(key)
                    merged.append(anomaly)
        return merged

    # --- checkpoints ---------------------------------------------------------------------------

    def before_save(self) -> dict:
        """The health recorded in the checkpoint's manifest; also stores the monitor state in the run state."""
        t, state = self.trainer, self.trainer.state
        reasons = list(self.unhealthy_since_save)
        scale = getattr(t.engine.optimizer, "cur_scale", None) if self.run.precision.dtype == "fp16" else None
        if scale is not None:
            reasons += [a.message for a in self.monitor.loss_scale_anomalies(float(scale))]
        healthy = not reasons
        bar = self.monitor.bar()
        median = None if bar is None else bar.reference
        if healthy and state.diverged_at is not None and state.step > state.diverged_at:
            state.retries = 0           # a healthy checkpoint past the last divergence: the budget is whole again
        state.health = self.monitor.state_dict()
        return {"healthy": healthy, "reasons": reasons, "step": state.step, "data_step": state.data_step,
                "loss_median": median, "loss_scale": None if scale is None else float(scale),
                "lr_scale": state.lr_scale}

    def in_publish_gap(self) -> None:
        """Rank 0, inside checkpoint.save: the old copy of a re-saved step is set aside, the new not yet in."""
        if self.faults is not None:
            self.faults.in_publish_gap(self.trainer.state.step)

    def after_save(self, path: Path) -> None:
        t, ckpt = self.trainer, self.run.checkpoint
        self.unhealthy_since_save = []
        if t.rank == 0 and ckpt.keep_last:
            deleted = retention.prune(path.parent, keep_last=ckpt.keep_last, keep_every=ckpt.keep_every)
            if deleted:
                t.metrics.log("retention", t.state.step, deleted=deleted)
        if self.faults is not None:
            self.faults.after_save(path, t.state.step)

    # --- divergence ----------------------------------------------------------------------------

    def recover(self, verdict: Verdict) -> None:
        """Collective: roll back to the last healthy checkpoint and change the run state, or give up."""
        t, rec, train = self.trainer, self.run.recovery, self.run.train
        state = t.state
        t.metrics.log("divergence", state.step, anomalies=verdict.anomalies, data_step=state.data_step)
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
            self._give_up(verdict, reason)
        self._roll_back(verdict, target)

    def _rollback_target(self, step: int):
        save_dir = Path(self.run.train.save_dir)
        tags = from_rank0(lambda: [c.tag for c in reversed(checkpoint.published(save_dir))
                                   if c.step < step and c.healthy])
        for tag in tags:
            problems = manifest.verify(save_dir / tag, self.run.checkpoint.verify)
            if not problems:
                return checkpoint.find(save_dir, tag)
            self.trainer.metrics.log("damaged_checkpoint", step, checkpoint=tag, problems=problems)
            self.incidents.write(f"step {step}: {tag} is damaged, not used for the rollback", problems)
            if self.trainer.rank == 0:
                print(f"[opt_ds] WARNING: {tag} is damaged ({problems[0]}); trying an older checkpoint", flush=True)
        return None

    def _roll_back(self, verdict: Verdict, target) -> None:
        t, rec, run = self.trainer, self.run.recovery, self.run
        before = t.state
        detected = before.step
        point = checkpoint.describe(Path(run.train.save_dir), target.tag)
        checkpoint.load(t.engine, point, verify="none")             # just verified
        restored = type(before).from_saved(point.run_state)
        optimization = not verdict.hardware_only
        skip = optimization and rec.skip_data
        lr_factor = rec.lr_factor if optimization else 1.0
        new_clip = rec.clip_grad if (optimization and rec.clip_grad is not None) else before.clip_grad
        t.state = dataclasses.replace(
            restored, data_offset=before.data_offset + (detected - restored.step if skip else 0),
            lr_scale=before.lr_scale * lr_factor, clip_grad=new_clip, retries=before.retries + 1,
            recoveries=before.recoveries + 1, diverged_at=detected)
        t.engine.module.micro_offset = t.state.micro_offset
        apply_optimizer_settings(t.engine, run, t.state)
        self.monitor.load_state_dict(t.state.health)
        self.unhealthy_since_save = []
        if t.rank == 0:
            checkpoint.set_aside_newer(run.train.save_dir, restored.step)
            checkpoint.point_latest(run.train.save_dir, target.tag)
        barrier()
        self._report_rollback(verdict, target, before, skip, lr_factor)

    def _report_rollback(self, verdict: Verdict, target, before, skip: bool, lr_factor: float) -> None:
        t, run = self.trainer, self.run
        after, detected = t.state, before.step
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
        t.metrics.log("recovery", detected, restored=target.tag, restored_step=target.step,
                      skipped_data_steps=[first + 1, last] if skip else None, data_step=after.data_step,
                      peak_lr=peak_after, lr_scale=after.lr_scale, clip_grad=clip_after, retries=after.retries,
                      anomalies=verdict.anomalies)
        if t.rank == 0:
            print(f"[opt_ds] DIVERGENCE at step {detected} ({verdict.summary()}): rolled back to {target.tag}, "
                  f"peak LR {peak_after:.4g}, clip {clip_after:g}", flush=True)

    def _give_up(self, verdict: Verdict, reason: str) -> None:
        t, train = self.trainer, self.run.train
        step = t.state.step
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
        t.metrics.log("gave_up", step, reason=reason, anomalies=verdict.anomalies)
        t.metrics.close()
        self.close()
        raise TrainingDiverged(f"training diverged at step {step} ({verdict.summary()}); {reason}. "
                               f"{fix[0].upper() + fix[1:]}" + (f". Incident log: {where}" if where else ""))

    # --- graceful stop -------------------------------------------------------------------------

    def stopped(self, verdict: Verdict) -> None:
        t, train = self.trainer, self.run.train
        t.metrics.log("stop", t.state.step, signal=verdict.stop, saved=bool(train.save_dir))
        if t.rank == 0:
            if train.save_dir:
                signals.write_marker(train.save_dir, t.state.step, verdict.stop)
            else:
                print("[opt_ds] WARNING: stopped on a signal without train.save_dir: nothing was saved", flush=True)

    def close(self) -> None:
        self.signals.restore()


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"
