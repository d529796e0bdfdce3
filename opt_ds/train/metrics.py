"""Run metrics: JSON lines always, TensorBoard and Weights & Biases when configured, one readable console line
per record (opt_ds.train.console).

Only global rank 0 writes; every record is one JSON object with an `event` field (train, eval, checkpoint,
...), so the log can be replayed or plotted without the run's code.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from opt_ds.train import console
from opt_ds.train.dashboards import TensorBoard, WeightsAndBiases, scalars


class MetricsLogger:
    def __init__(self, log_dir, *, enabled: bool, tensorboard: bool = True, wandb=None, config: dict = None,
                 tokens_per_step: int = 0):
        """`wandb`: a WandbConfig (W&B on when its project is set); `config`: the resolved run config, shown
        as text on the dashboards; `tokens_per_step`: the tokens axis of the dashboards."""
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.path = None
        self._file = None
        self._dashboards = []
        if not enabled:
            return
        if log_dir is not None:
            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self.path = log_dir / "metrics.jsonl"
            self._file = self.path.open("a", buffering=1)
            if tensorboard:
                try:
                    self._dashboards.append(TensorBoard(log_dir))
                except ImportError:            # tensorboard is optional
                    pass
        if wandb is not None and wandb.project is not None:
            self._dashboards.append(WeightsAndBiases(wandb, log_dir, config or {}))
            self.say(self._dashboards[-1].description)
        if config is not None:
            import yaml
            self.text("config", yaml.safe_dump(config, sort_keys=False), 0)

    def log(self, event: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        if self._file is not None:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
        values = scalars(fields)
        if values:
            for dashboard in self._dashboards:
                dashboard.log(event, step, step * self.tokens_per_step, values)
        if event == "sample":
            self.text("sample", f"{fields.get('prompt') or ''}{fields.get('text', '')}", step)
        print(console.line(event, step, fields), flush=True)

    def say(self, text: str) -> None:
        """A sentence for the person watching (rank 0), not a record."""
        if self.enabled:
            print(f"{console.PREFIX} {text}", flush=True)

    def text(self, tag: str, text: str, step: int) -> None:
        for dashboard in self._dashboards:
            dashboard.text(tag, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for dashboard in self._dashboards:
            dashboard.close()
        self._dashboards = []


def _jsonable(value):
    return str(value)


def read_metrics(path, event: str = None) -> list:
    """The records of a metrics.jsonl file (optionally only one event type)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]
