"""What watches a training run, step by step, for the Trainer: the health checks, the graceful stop, fault
injection and divergence recovery, each a small object of its own. The Trainer owns the run state and asks;
the supervisor is given what it needs (the config, the engine, the metrics) and answers with a verdict or a
new run state, never touching the Trainer.

After every step all ranks agree on one verdict (opt_ds.train.collective.any_rank): healthy, stop requested,
or diverged; the Trainer then saves and stops, or asks `recover` for the run state to continue from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opt_ds.train import checkpoint, retention, signals
from opt_ds.train.collective import all_gather_objects, any_rank, barrier
from opt_ds.train.health import HealthMonitor, ReplicaNormProbe, StepObservation
from opt_ds.train.incidents import IncidentLog
from opt_ds.train.recovery import Recovery, apply_optimizer_settings, incident_path


@dataclass
class Verdict:
    step: int
    anomalies: list             # dicts (kind, message, fatal, hardware), merged over the ranks
    diverged: bool
    hardware_only: bool         # every fatal anomaly points at a host, none at the optimization
    stop: Optional[str]         # the signal that asked for a stop, on whichever rank it arrived

    def summary(self) -> str:
        return "; ".join(a["message"] for a in self.anomalies if a["fatal"]) or "none"


class Supervisor:
    def __init__(self, run, engine, metrics, *, rank: int, world_size: int, data_parallel: int):
        self.run, self.engine, self.metrics, self.rank = run, engine, metrics, rank
        probe_on = run.health.enabled and run.health.replica_check and data_parallel > 1
        self.probe = ReplicaNormProbe(engine) if probe_on else None
        self.monitor = HealthMonitor(run.health, fp16=run.precision.dtype == "fp16",
                                     deepspeed_min_loss_scale=run.precision.min_loss_scale,
                                     replica_names=self.probe.names() if self.probe else None)
        self.signals = signals.StopSignals(rank)
        self.incidents = IncidentLog(incident_path(run.train), enabled=rank == 0)
        self.recovery = Recovery(run, engine, metrics, self.incidents, rank=rank)
        self.unhealthy_since_save: list = []
        self._skipped_before = 0
        self.faults = None
        if run.faults.armed():
            from opt_ds.train.faults import FaultInjector
            # after the probe: its gradient hook must run first
            self.faults = FaultInjector(run.faults, engine, metrics, rank=rank, world_size=world_size)

    # --- start ---------------------------------------------------------------------------------

    def start(self, state, resumed) -> None:
        """After the engine is built and any resume (a checkpoint.ResumePoint) is loaded: restore the health
        state, re-apply the LR and clipping of the run state, and make the save folder hold this run's
        trajectory only (rollback picks from it): checkpoints not behind the resumed one go to abandoned/."""
        train = self.run.train
        self.monitor.load_state_dict(state.health)
        apply_optimizer_settings(self.engine, self.run, state)
        if self.rank == 0 and train.save_dir:
            signals.clear_marker(train.save_dir)
            resumed_here = resumed is not None and resumed.directory.resolve() == Path(train.save_dir).resolve()
            moved = checkpoint.set_aside_newer(train.save_dir, state.step if resumed_here else -1)
            if resumed_here and checkpoint.latest_tag(train.save_dir) != resumed.tag:
                checkpoint.point_latest(train.save_dir, resumed.tag)
            if moved:
                origin = f"resumed from {resumed.folder}" if resumed else "started from scratch"
                print(f"[opt_ds] WARNING: {origin}: the checkpoints {', '.join(moved)} in {train.save_dir} belong "
                      f"to another trajectory and were moved to {Path(train.save_dir) / checkpoint.ABANDONED}",
                      flush=True)
                self.metrics.log("abandoned", state.step, checkpoints=moved)
        if self.faults is not None:
            self.faults.announce(state.step)
        barrier()

    # --- every step ----------------------------------------------------------------------------

    def before_step(self, state) -> None:
        self._skipped_before = self.engine.skipped_steps
        if self.faults is not None:
            self.faults.before_step(state)

    def after_step(self, step: int, record: dict) -> Verdict:
        """Collective: judge step `step`, which just ran; every rank returns the same verdict. Adds the
        health figures to `record`."""
        engine = self.engine
        if self.faults is not None:
            self.faults.after_step()
        replica_norms = self.probe.take() if self.probe else None
        observation = StepObservation(step=step, loss=record["loss"], grad_norm=record["grad_norm"],
                                      loss_scale=record.get("loss_scale"),
                                      overflow=engine.skipped_steps > self._skipped_before,
                                      replica_norms=replica_norms)
        bar = self.monitor.bar()            # the bar this step was judged against
        local = self.monitor.observe(observation)
        if bar is not None:
            record["spike_threshold"] = bar.threshold
        record["clip_grad"] = float(getattr(engine.optimizer, "clip_grad", engine.gradient_clipping()))
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
            self.metrics.log("anomaly", step, anomalies=anomalies)
            self.unhealthy_since_save += [a["message"] for a in anomalies]
        return Verdict(step, anomalies, fatal, fatal and not optimization, stop_signal)

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

    def before_save(self, state):
        """(the health recorded in the checkpoint's manifest, the run state to save: with the monitor's
        state, and a whole retry budget once a healthy checkpoint is past the last divergence)."""
        reasons = list(self.unhealthy_since_save)
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.run.precision.dtype == "fp16" else None
        if scale is not None:
            reasons += [a.message for a in self.monitor.loss_scale_anomalies(float(scale))]
        healthy = not reasons
        bar = self.monitor.bar()
        median = None if bar is None else bar.reference
        retries = 0 if healthy and state.diverged_at is not None and state.step > state.diverged_at else state.retries
        state = dataclasses.replace(state, retries=retries, health=self.monitor.state_dict())
        return {"healthy": healthy, "reasons": reasons, "step": state.step, "data_step": state.data_step,
                "loss_median": median, "loss_scale": None if scale is None else float(scale),
                "lr_scale": state.lr_scale}, state

    def in_publish_gap(self, step: int) -> None:
        """Rank 0, inside checkpoint.save: the old copy of a re-saved step is set aside, the new not yet in."""
        if self.faults is not None:
            self.faults.in_publish_gap(step)

    def after_save(self, path: Path, step: int) -> None:
        ckpt = self.run.checkpoint
        self.unhealthy_since_save = []
        if self.rank == 0 and ckpt.keep_last:
            deleted = retention.prune(path.parent, keep_last=ckpt.keep_last, keep_every=ckpt.keep_every)
            if deleted:
                self.metrics.log("retention", step, deleted=deleted)
        if self.faults is not None:
            self.faults.after_save(path, step)

    # --- divergence ----------------------------------------------------------------------------

    def recover(self, state, verdict: Verdict):
        """Collective: the run state rolled back to the last healthy checkpoint (loaded into the engine), or
        TrainingDiverged when the recovery gives up."""
        try:
            state = self.recovery.recover(state, verdict)
        except BaseException:
            self.close()
            raise
        self.monitor.load_state_dict(state.health)
        self.unhealthy_since_save = []
        return state

    # --- graceful stop -------------------------------------------------------------------------

    def stopped(self, step: int, verdict: Verdict) -> None:
        train = self.run.train
        self.metrics.log("stop", step, signal=verdict.stop, saved=bool(train.save_dir))
        if self.rank == 0:
            if train.save_dir:
                signals.write_marker(train.save_dir, step, verdict.stop)
            else:
                print("[opt_ds] WARNING: stopped on a signal without train.save_dir: nothing was saved", flush=True)

    def close(self) -> None:
        self.signals.restore()
