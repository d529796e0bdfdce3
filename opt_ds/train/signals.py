"""Graceful stop on SIGTERM / SIGUSR1 (SLURM pre-emption and time limits, `scancel --signal`).

The handler only records the signal; the training loop folds it into the per-step collective verdict
(opt_ds.train.collective.any_rank), so when the signal reaches only some ranks every rank still stops after
the same step, saves, and exits 0. After the stop rank 0 writes `<save_dir>/preempted.json`, which the SLURM
script (launchers/slurm.sbatch) reads to requeue the job.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from opt_ds.durable import write_atomically

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_MARKER = "preempted.json"


class StopSignals:
    def __init__(self, rank: int):
        self.rank = rank
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return                      # Python delivers signals to the main thread only
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"[opt_ds] rank {self.rank}: {self.received} received; finishing this step, then saving and "
                  "stopping", flush=True)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def write_marker(save_dir, step: int, signal_name: Optional[str]) -> None:
    """Rank 0 only: record that the run stopped early and should be resumed (the job script requeues)."""
    write_atomically(Path(save_dir) / PREEMPTED_MARKER,
                     json.dumps({"step": step, "signal": signal_name, "time": round(time.time(), 3)}) + "\n")


def clear_marker(save_dir) -> None:
    marker = Path(save_dir) / PREEMPTED_MARKER
    if marker.is_file():
        marker.unlink()
