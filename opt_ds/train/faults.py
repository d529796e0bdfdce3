"""Fault injection, for tests of recovery and crash safety. Never on by accident: a config whose `faults:`
section names a step is rejected unless the environment sets OPT_DS_FAULT_INJECTION=1, and an armed run says
so on the console and in metrics.jsonl before its first step.

Steps are numbered as the metrics show them (the k-th optimizer step is step k). The faults:
- nan_at_step: before step k one weight of the first pipeline stage becomes NaN. Every later loss is NaN and
  DeepSpeed's overflow check skips every later update, so only restoring the weights helps. Fires once
  (`persistent: true`: every time step k is reached, to exhaust the retry budget).
- spike_at_step: the batch that an uninterrupted run reads at step k makes an update with 100x the LR (an
  optimizer instability triggered by that data); the loss spikes on the next steps. Tied to the data
  position, so it fires again unless recovery skips that batch.
- kill_during_save_at_step: while the checkpoint of step k is written, rank `rank` writes half of its first
  file and dies with os._exit(137), as a node that loses power or is OOM-killed.
- corrupt_checkpoint_at_step: after the checkpoint of step k is published, one of its files is truncated.
- kill_in_publish_gap_at_step: re-saving step k when it is already published (e.g. a stop signal right after an interval save), rank 0
  dies with os._exit(137) after renaming the old copy aside and before renaming the new one into place.
- bad_replica_at_step: during step k the local gradients of rank `rank` are multiplied by 1000 before the
  data-parallel reduction, as a host silently computing garbage.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
import torch.distributed as dist

from opt_ds.train.checkpoint import STAGING, step_tag
from opt_ds.patches import before_reduce_grads, local_gradients, wrap_checkpoint_writes

SPIKE_LR_MULTIPLIER = 100.0
BAD_REPLICA_SCALE = 1000.0


class FaultInjector:
    def __init__(self, cfg, engine, metrics, *, rank: int, world_size: int):
        """`cfg`: the config's faults section."""
        self.cfg, self.engine, self.metrics, self.rank = cfg, engine, metrics, rank
        self.target_rank = cfg.rank % world_size
        self.fired = set()
        self._spiking = False
        self._step = 0                  # the step being trained
        if cfg.kill_during_save_at_step is not None and rank == self.target_rank:
            self._kill_during_writes(engine, STAGING + step_tag(cfg.kill_during_save_at_step))
        if cfg.bad_replica_at_step is not None and rank == self.target_rank:
            before_reduce_grads(engine, self._bad_replica)

    def announce(self, step: int) -> None:
        armed = self.cfg.armed()
        text = ", ".join(f"{k}={v}" for k, v in armed.items())
        if self.rank == 0:
            print(f"[opt_ds] !!! FAULT INJECTION ARMED: {text} (rank {self.target_rank}); this run is broken on "
                  "purpose, for tests !!!", flush=True)
        self.metrics.log("faults_armed", step, rank=self.target_rank, **armed)

    def _say(self, text: str) -> None:
        print(f"[opt_ds] FAULT (rank {self.rank}): {text}", flush=True)

    # --- training --------------------------------------------------------------------------------

    def before_step(self, state) -> None:
        engine = self.engine
        self._step = state.step + 1
        if self.cfg.nan_at_step == state.step + 1 and (self.cfg.persistent or "nan" not in self.fired):
            self.fired.add("nan")
            if engine.is_first_stage():
                weight = next(p for p in engine.module.parameters() if p.dim() >= 2)
                with torch.no_grad():
                    weight.view(-1)[0] = float("nan")
                self._say(f"a weight is NaN before step {state.step + 1}")
        if self.cfg.spike_at_step == state.data_step + 1:
            engine.lr_scheduler.scale_this_step(SPIKE_LR_MULTIPLIER)
            self._spiking = True
            if self.rank == 0:
                self._say(f"step {state.step + 1} reads the poisoned batch {self.cfg.spike_at_step}: "
                          f"{SPIKE_LR_MULTIPLIER:g}x LR update")

    def after_step(self) -> None:
        if self._spiking:
            self.engine.lr_scheduler.apply()
            self._spiking = False

    def _bad_replica(self) -> None:
        if self._step != self.cfg.bad_replica_at_step or "bad_replica" in self.fired:
            return
        self.fired.add("bad_replica")
        for grad in local_gradients(self.engine):
            grad.mul_(BAD_REPLICA_SCALE)
        self._say(f"local gradients x{BAD_REPLICA_SCALE:g} in step {self.cfg.bad_replica_at_step}")

    # --- checkpoints -----------------------------------------------------------------------------

    def _kill_during_writes(self, engine, staging: str) -> None:
        def wrap(write):
            def save(state_dict, path):
                if staging not in str(path):
                    return write(state_dict, path)
                buffer = io.BytesIO()
                torch.save(state_dict, buffer)
                data = buffer.getvalue()
                with open(path, "wb") as f:
                    f.write(data[:len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                self._say(f"killed half-way through writing {path} ({len(data) // 2} of {len(data)} bytes)")
                os._exit(137)

            return save

        wrap_checkpoint_writes(engine, wrap)

    def in_publish_gap(self, step: int) -> None:
        if self.cfg.kill_in_publish_gap_at_step == step:
            self._say(f"killed while publishing global_step{step}: the old copy is set aside, the new one is not "
                      "in place yet")
            os._exit(137)

    def after_save(self, path: Path, step: int) -> None:
        if self.cfg.corrupt_checkpoint_at_step != step or dist.get_rank() != 0:
            return
        victim = sorted(path.glob("layer_*"))[0]
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
        self._say(f"truncated {victim} from {size} to {size // 2} bytes")
