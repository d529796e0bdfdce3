"""Per-step wall time: CUDA events on a GPU (no host synchronisation until all steps are done), or
`time.perf_counter` around each step on a CPU, where every operation has finished when it returns."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch


class StepTimer:
    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._events: list = []
        self._seconds: list = []

    @contextlib.contextmanager
    def step(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds.append(time.perf_counter() - t0)

    def seconds(self) -> list:
        """Duration of every timed step, in order (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in self._events]
        return list(self._seconds)


def median(values: list) -> float:
    return statistics.median(values)


def slowest_rank_per_step(per_rank: list) -> list:
    """Step i lasts as long as its slowest rank: the optimizer step waits for every rank."""
    return [max(step) for step in zip(*per_rank)]


def time_steps(step, steps: int, warmup: int) -> dict:
    """Run `step()` warmup + steps times; time the last `steps`. Returns this rank's raw measurement:
    per-step seconds, peak memory over warm-up and timed steps, GPU energy/power/utilisation over the
    timed window, and the last loss."""
    from opt_ds.bench.telemetry import GpuMonitor, peak_memory, reset_peak_memory

    reset_peak_memory()
    loss = None
    for _ in range(warmup):
        loss = step()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    monitor, timer = GpuMonitor(), StepTimer()
    monitor.start()
    for _ in range(steps):
        with timer.step():
            loss = step()
    seconds = timer.seconds()
    gpu = monitor.stop()
    return {"step_times_s": seconds, "memory": peak_memory(), "gpu": gpu,
            "loss": float(loss) if loss is not None else None}
