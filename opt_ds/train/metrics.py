"""Run metrics: JSON lines always, TensorBoard when it is installed, one readable console line per record.

Only global rank 0 writes; every record is one JSON object with an `event` field (train, eval, checkpoint,
...), so the log can be replayed or plotted without the run's code.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, log_dir, *, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = None
        self._file = None
        self._tb = None
        if not enabled or log_dir is None:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(log_dir / "tensorboard"))
            except ImportError:            # tensorboard is optional
                self._tb = None

    def log(self, event: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        if self._file is not None:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{event}/{key}", value, step)
        print(_console_line(event, step, fields), flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value):
    return str(value)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _console_line(event: str, step: int, fields: dict) -> str:
    shown = " ".join(f"{k}={_format(v)}" for k, v in fields.items() if not isinstance(v, (dict, list)))
    return f"[opt_ds] {event} step={step} {shown}"


def read_metrics(path, event: str = None) -> list:
    """The records of a metrics.jsonl file (optionally only one event type)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]
