"""Dashboards a run writes to besides metrics.jsonl: TensorBoard and Weights & Biases.

Both receive the same scalars, `<event>/<name>` (train/loss, eval/loss, train/tokens_per_second, ...) against
the optimizer step; TensorBoard also plots them against consumed tokens (`<event>-vs-tokens/<name>`, W&B
records `consumed_tokens` to choose as its x-axis), and both get the resolved config and the text samples.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def scalars(fields: dict) -> dict:
    """The finite numbers of a record (booleans and text left out)."""
    return {k: v for k, v in fields.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir / "tensorboard"))

    def log(self, event: str, step: int, tokens: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{event}/{key}", value, step)
            if event in ("train", "eval"):
                self.writer.add_scalar(f"{event}-vs-tokens/{key}", value, tokens)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, f"```\n{text}\n```", step)       # markdown: keep line breaks

    def close(self) -> None:
        self.writer.close()


class WeightsAndBiases:
    def __init__(self, settings, log_dir, config: dict):
        import wandb
        from opt_ds.quiet import VERBOSE_ENV
        directory = Path(settings.dir or log_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name,
                              mode=settings.mode, dir=str(directory), config=config, reinit="finish_previous",
                              settings=wandb.Settings(silent=os.environ.get(VERBOSE_ENV) != "1"))
        self.description = (f"Weights & Biases run {self.run.name!r} ({settings.mode}) in {directory / 'wandb'}"
                            + (": `wandb sync` uploads it" if settings.mode == "offline" else ""))
        # The step is a logged value, not W&B's own step counter, which may not go back (a rollback does).
        self.run.define_metric("step")
        self.run.define_metric("consumed_tokens")
        for event in ("train", "eval"):
            self.run.define_metric(f"{event}/*", step_metric="step")

    def log(self, event: str, step: int, tokens: int, values: dict) -> None:
        self.run.log({**{f"{event}/{k}": v for k, v in values.items()}, "step": step, "consumed_tokens": tokens})

    def text(self, tag: str, text: str, step: int) -> None:
        import wandb
        self.run.log({tag: wandb.Html(f"<pre>{text}</pre>"), "step": step})

    def close(self) -> None:
        self.run.finish()
