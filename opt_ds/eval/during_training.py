"""`eval.tasks` and `eval.perplexity` of a run config, run on the live training engine.

The tasks and files are checked when the run starts (bad ones stop it before any work). During the run an
evaluation that fails is logged as an `eval_tasks_failed` record and training goes on; results are logged
as one `eval_tasks` record ({"task/metric": value, "perplexity/NAME": value}) to metrics.jsonl and
TensorBoard, beside the validation loss. The engine is scored with the training micro-batch size and
`batch.seq_length` as the longest input.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from opt_ds.config import ResolvedConfig
from opt_ds.eval import perplexity as ppl
from opt_ds.eval import tasks as harness_tasks


class DownstreamEvaluation:
    def __init__(self, cfg: ResolvedConfig):
        from opt_ds.train.loop import run_tokenizer
        self.settings = cfg.run.eval
        self.seq_length = cfg.run.batch.seq_length
        self.micro_batch = cfg.run.batch.micro_batch_size
        self.interval = self.settings.interval or cfg.run.train.eval_interval
        self.tokenizer = run_tokenizer(cfg)
        for source in self.settings.perplexity:
            ppl.check_source(source)
        self.manager = None
        if self.settings.tasks:
            self.manager = harness_tasks.task_manager(self.settings.tasks, self.settings.include_path)
            harness_tasks.check_loadable(self.manager, self.settings.tasks)

    def __call__(self, engine, step: int, metrics) -> None:
        from opt_ds.eval.harness import OptDsLM
        started = time.perf_counter()
        say = (lambda line: print(f"[opt_ds] eval_tasks {line}", flush=True)) if dist.get_rank() == 0 else None
        lm = OptDsLM(engine, self.tokenizer, max_length=self.seq_length, micro_batch=self.micro_batch, progress=say)
        record, failed = {}, {}
        for task in self.settings.tasks:       # one at a time, so a failing task costs only its own metrics
            try:
                results = harness_tasks.evaluate(lm, self.manager, [task], num_fewshot=self.settings.num_fewshot,
                                                 limit=self.settings.limit)
                record.update(harness_tasks.flat_metrics(results or {}))
            except Exception as err:      # a downstream task must never stop training
                failed[task] = f"{type(err).__name__}: {err}"
        for source in self.settings.perplexity:
            try:
                measured = ppl.perplexity(lm.scorer, self.tokenizer, source, window=self.seq_length,
                                          stride=self.seq_length)
                record[f"perplexity/{Path(source).name}"] = measured.perplexity
            except Exception as err:
                failed[source] = f"{type(err).__name__}: {err}"
        engine.train()
        for what, error in failed.items():
            metrics.log("eval_tasks_failed", step, task=what, error=error)
        metrics.log("eval_tasks", step, seconds=round(time.perf_counter() - started, 3), **record)
