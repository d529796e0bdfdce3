"""The training loop: DeepSpeed pipeline engine + data + metrics + periodic validation and checkpoints."""
from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from opt_ds.config import ResolvedConfig
from opt_ds.models import flops
from opt_ds.models.presets import analytic_parameter_count
from opt_ds.train import checkpoint
from opt_ds.parallel.checkpoint_info import checkpoint_client_state
from opt_ds.parallel.pipe import recomputed_decoder_layers
from opt_ds.train.batches import ReplicaBatches
from opt_ds.train.engine import build_engine
from opt_ds.train.metrics import MetricsLogger
from opt_ds.train.recovery import Supervisor


@dataclass
class RunState:
    """What a checkpoint must carry besides DeepSpeed's own state for the resume to be exact."""
    step: int = 0
    micro_offset: int = 0           # forward passes so far: DeepSpeed derives dropout seeds from it
    # Divergence recovery (opt_ds.train.recovery); run state, so every later resume keeps it.
    data_offset: int = 0            # data steps skipped: step s reads the batch of data step s + data_offset
    lr_scale: float = 1.0           # product of the LR cuts: peak LR = optimizer.lr x lr_scale
    clip_grad: Optional[float] = None   # gradient clipping set by a recovery (None: optimizer.clip_grad)
    retries: int = 0                # rollbacks since the last healthy checkpoint past `diverged_at`
    recoveries: int = 0             # rollbacks in the whole run
    diverged_at: Optional[int] = None   # step of the last divergence
    health: dict = field(default_factory=dict)  # the health monitor's loss EWM

    @property
    def data_step(self) -> int:
        return self.step + self.data_offset

    def client_state(self, cfg: ResolvedConfig) -> dict:
        return {**checkpoint_client_state(cfg.shape),
                checkpoint.RUN_STATE_KEY: {
                    **asdict(self), "config": cfg.run.to_dict(),
                    "layout": {"tensor": cfg.tensor, "pipeline": cfg.pipeline, "data": cfg.data}}}

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        names = [f for f in cls.__dataclass_fields__ if f in saved]      # older checkpoints lack the newer fields
        return cls(**{name: saved[name] for name in names})


def build_datasets(cfg: ResolvedConfig):
    """(train, valid) datasets: the blended indexed corpora of `data.train`, or synthetic tokens."""
    run = cfg.run
    seq = run.batch.seq_length
    if not run.data.train:
        from opt_ds.data.synthetic import SyntheticTokens
        return (SyntheticTokens(cfg.shape.vocab_size, seq, seed=run.train.seed, kind=run.data.synthetic),
                SyntheticTokens(cfg.shape.vocab_size, seq, seed=run.train.seed + 1, kind=run.data.synthetic))
    from opt_ds.data.datasets import build_datasets as build_indexed
    steps = run.train.steps
    valid_samples = max(1, (steps // max(1, run.train.eval_interval) + 2) * run.train.eval_iters) \
        * run.batch.global_batch_size
    return build_indexed(blend=[(entry.path, entry.weight) for entry in run.data.train], split=run.data.split,
                         seq_length=seq, seed=run.train.seed, num_train_samples=steps * run.batch.global_batch_size,
                         num_valid_samples=valid_samples, cache_dir=run.data.cache_dir,
                         vocab_size=cfg.shape.vocab_size)


def run_tokenizer(cfg: ResolvedConfig):
    """data.tokenizer if set, else the tokenizer saved beside the first corpus, else OPT's."""
    from opt_ds.data.tokenizer import load_tokenizer
    data = cfg.run.data
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if data.train:
        from opt_ds.data.datasets import dataset_tokenizer
        return dataset_tokenizer(data.train[0].path)
    return load_tokenizer("opt")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # KiB on Linux


class Trainer:
    def __init__(self, cfg: ResolvedConfig):
        self.cfg = cfg
        run = cfg.run
        self.resume_point = checkpoint.find_resume_point(run.train.save_dir, run.train.load_dir,
                                                          run.train.load_tag)
        if self.resume_point is not None:
            checkpoint.check_compatible(self.resume_point, cfg.shape, cfg.layout)
        universal = self.resume_point is not None and self.resume_point.kind == "universal"
        self.engine = build_engine(cfg, load_universal=universal)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.state = RunState()
        self.metrics = MetricsLogger(run.train.log_dir, enabled=self.rank == 0, tensorboard=run.train.tensorboard)
        self.train_data, self.valid_data = build_datasets(cfg)
        self.recomputed_layers = self._recomputed_layers()
        self.supervisor = Supervisor(self)
        if self.resume_point is not None:
            self._resume(self.resume_point)
        self.supervisor.start(self.resume_point)

    # --- data ------------------------------------------------------------------------------------

    def batches(self, dataset, start_step: int) -> ReplicaBatches:
        batch = self.cfg.run.batch
        return ReplicaBatches(dataset, global_batch=batch.global_batch_size, micro_batch=batch.micro_batch_size,
                              data_parallel_size=self.cfg.data,
                              data_parallel_rank=self.engine.grid.data_parallel_id, start_step=start_step)

    # --- checkpoints -----------------------------------------------------------------------------

    def _resume(self, point) -> None:
        checkpoint.load(self.engine, point, verify=self.cfg.run.checkpoint.verify)
        if point.kind == "weights" or point.run_state is None:
            self.metrics.log("resume", 0, checkpoint=str(point.folder), kind=point.kind,
                             note="weights only: optimizer state, LR schedule and data position start afresh")
            return
        self.state = RunState.from_saved(point.run_state)
        self.engine.module.micro_offset = self.state.micro_offset
        self.metrics.log("resume", self.state.step, checkpoint=str(point.folder), kind=point.kind, tag=point.tag)

    def save(self) -> None:
        self.state.micro_offset = self.engine.module.micro_offset
        health = self.supervisor.before_save()
        path = checkpoint.save(self.engine, self.cfg.run.train.save_dir, self.state.step,
                               self.state.client_state(self.cfg), health=health)
        self.metrics.log("checkpoint", self.state.step, path=str(path), healthy=health["healthy"])
        self.supervisor.after_save(path)

    # --- steps -----------------------------------------------------------------------------------

    def _recomputed_layers(self) -> int:
        """Decoder layers, over all stages, whose forward DeepSpeed re-runs in the backward pass."""
        count = torch.tensor(recomputed_decoder_layers(self.engine.module), dtype=torch.long)
        dist.all_reduce(count, group=self.engine.grid.get_pipe_parallel_group())
        return int(count)

    def train_step(self, batches) -> dict:
        self.supervisor.before_step()
        lr = self.engine.get_lr()[0]
        started = time.perf_counter()
        loss = self.engine.train_batch(batches).item()
        seconds = time.perf_counter() - started
        self.state.step += 1
        return self.step_metrics(loss, lr, seconds)

    def step_metrics(self, loss: float, lr: float, seconds: float) -> dict:
        run, shape = self.cfg.run, self.cfg.shape
        batch, seq = run.batch.global_batch_size, run.batch.seq_length
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_seconds": seconds,
            "tokens_per_second": batch * seq / seconds,
            "model_tflops_per_gpu": flops.model_flops(shape, batch, seq).flops / seconds / self.world_size / 1e12,
            "hardware_tflops_per_gpu": flops.hardware_flops(shape, batch, seq, self.recomputed_layers).flops
            / seconds / self.world_size / 1e12,
            "peak_memory_gib": peak_memory_gib(),
        }
        loss_scale = getattr(self.engine.optimizer, "cur_scale", None) if run.precision.dtype == "fp16" else None
        if loss_scale is not None:
            record["loss_scale"] = float(loss_scale)
        record["skipped_steps"] = int(self.engine.skipped_steps)
        return record

    def evaluate(self) -> dict:
        iters = self.cfg.run.train.eval_iters
        batches = self.batches(self.valid_data, 0)
        losses = [self.engine.eval_batch(batches).item() for _ in range(iters)]
        loss = sum(losses) / len(losses)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        self.metrics.log("eval", self.state.step, **result)
        return result

    def sample(self) -> str:
        from opt_ds.train.generate import sample_text
        run = self.cfg.run
        sample = run.sample
        text = sample_text(self.engine, run_tokenizer(self.cfg), sample.prompt,
                           seq_length=run.batch.seq_length, micro_batch=run.batch.micro_batch_size,
                           max_new_tokens=sample.max_new_tokens, top_p=sample.top_p,
                           temperature=sample.temperature, seed=sample.seed)
        self.metrics.log("sample", self.state.step, prompt=sample.prompt, text=text)
        return text

    def train(self) -> dict:
        train = self.cfg.run.train
        self.metrics.log("start", self.state.step, layout=str(self.cfg.layout),
                         flops_formulas={"model_tflops_per_gpu": flops.MODEL_FORMULA,
                                         "hardware_tflops_per_gpu": flops.HARDWARE_FORMULA},
                         recomputed_layers=self.recomputed_layers,
                         parameters=analytic_parameter_count(self.cfg.shape), config=self.cfg.run.to_dict())
        if train.eval_interval and self.state.step == 0:
            self.evaluate()
        batches = self.batches(self.train_data, self.state.data_step)
        last = {}
        while self.state.step < train.steps:
            last = self.train_step(batches)
            verdict = self.supervisor.after_step(last)      # collective: every rank takes the same decision
            step = self.state.step
            if step % train.log_interval == 0 or step == train.steps or verdict.diverged or verdict.stop:
                self.metrics.log("train", step, **last)
            if verdict.diverged:
                self.supervisor.recover(verdict)            # rolls back (or raises TrainingDiverged)
                batches = self.batches(self.train_data, self.state.data_step)
                continue
            if verdict.stop:
                return self.stop(verdict, last)
            if train.eval_interval and step % train.eval_interval == 0 and step != train.steps:
                self.evaluate()
            if train.save_dir and train.save_interval and step % train.save_interval == 0 and step != train.steps:
                self.save()
        if train.eval_interval:
            last["eval"] = self.evaluate()
        if train.save_dir:
            self.save()
        if self.cfg.run.sample.prompt:
            self.sample()
        self.metrics.log("end", self.state.step)
        self.metrics.close()
        self.supervisor.close()
        return last

    def stop(self, verdict, last: dict) -> dict:
        """A stop signal reached some rank: save this step and return (the CLI exits 0)."""
        if self.cfg.run.train.save_dir:
            self.save()
        self.supervisor.stopped(verdict)
        self.metrics.close()
        self.supervisor.close()
        return last
