"""The training loop: DeepSpeed pipeline engine + data + metrics + periodic validation and checkpoints."""
from __future__ import annotations

import math
import resource
import time

import torch
import torch.distributed as dist

from opt_ds.config import ResolvedConfig
from opt_ds.models import flops
from opt_ds.models.presets import analytic_parameter_count
from opt_ds.patches import forward_passes, set_forward_passes
from opt_ds.train import checkpoint, run_folder, save_lock
from opt_ds.parallel.pipe import recomputed_decoder_layers
from opt_ds.train.batches import ReplicaBatches
from opt_ds.train.contract import RunState
from opt_ds.train.engine import build_engine
from opt_ds.train.metrics import MetricsLogger
from opt_ds.train.supervisor import Supervisor


def check_data(cfg: ResolvedConfig) -> None:
    """The corpora of `data.train` exist, are whole .bin/.idx pairs and fit the model's vocabulary: checked
    before the engine is built or anything is written, so a bad path costs no start-up."""
    if cfg.run.data.train:
        from opt_ds.data.datasets import check_corpora
        check_corpora([(entry.path, entry.weight) for entry in cfg.run.data.train], cfg.run.data.split,
                      validation_samples(cfg), cfg.shape.vocab_size)


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
    return build_indexed(blend=[(entry.path, entry.weight) for entry in run.data.train], split=run.data.split,
                         seq_length=seq, seed=run.train.seed, num_train_samples=steps * run.batch.global_batch_size,
                         num_valid_samples=validation_samples(cfg), cache_dir=run.data.cache_dir,
                         vocab_size=cfg.shape.vocab_size, split_seed=run.data.split_seed)


def validation_samples(cfg: ResolvedConfig) -> int:
    """Validation evaluates samples [0, eval_iters x global batch) of the fixed validation set: the same
    samples in every run with these settings, whatever its steps, eval_interval or layout."""
    return cfg.run.train.eval_iters * cfg.run.batch.global_batch_size


def run_tokenizer(cfg: ResolvedConfig):
    """data.tokenizer if set, else the tokenizer saved beside the first corpus, else OPT's."""
    from opt_ds.data.tokenizer import load_tokenizer, tokenizer_of_run
    return tokenizer_of_run(cfg.run.to_dict()["data"]) or load_tokenizer("opt")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # KiB on Linux


class Trainer:
    def __init__(self, cfg: ResolvedConfig, downstream=None):
        """`downstream(engine, step, metrics)`: an extra evaluation (opt_ds.eval.during_training) run every
        `downstream.interval` steps and at the end."""
        self.cfg = cfg
        self.downstream = downstream
        run, save_dir = cfg.run, cfg.run.train.save_dir
        check_data(cfg)
        if run.sample.prompt:       # a prompt that does not fit fails now, not after the training
            from opt_ds.train.generate import prompt_ids
            prompt_ids(run_tokenizer(cfg), run.sample.prompt, seq_length=run.batch.seq_length,
                       max_new_tokens=run.sample.max_new_tokens, max_new_tokens_name="sample.max_new_tokens")
        cfg.layout.initialize()         # process groups first: every rank takes the start-up decisions together
        self.save_lock = save_lock.claim(save_dir) if save_dir else None
        repairs = checkpoint.recover_interrupted_publish(save_dir, run.checkpoint.verify) if save_dir else []
        self.resume_point = checkpoint.find_resume_point(save_dir, run.train.load_dir, run.train.load_tag)
        if self.resume_point is not None:
            checkpoint.check_compatible(self.resume_point, cfg.shape, cfg.layout)
        if self.save_lock is not None:
            self.save_lock.record_holder()
        universal = self.resume_point is not None and self.resume_point.kind == "universal"
        self.engine = build_engine(cfg, load_universal=universal)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.state = RunState()
        self.metrics = MetricsLogger(run.train.log_dir, enabled=self.rank == 0, tensorboard=run.train.tensorboard,
                                     wandb=run.train.wandb, config=run.to_dict(),
                                     tokens_per_step=run.batch.global_batch_size * run.batch.seq_length)
        if self.rank == 0 and run.train.log_dir is not None:
            run_folder.write(run.train.log_dir, cfg, self.world_size)
        if repairs:
            self.metrics.log("checkpoint_repaired", 0, actions=repairs)
        self.train_data, self.valid_data = build_datasets(cfg)
        self.recomputed_layers = self._recomputed_layers()
        self.supervisor = Supervisor(run, self.engine, self.metrics, rank=self.rank, world_size=self.world_size,
                                     data_parallel=cfg.data_parallel)
        if self.resume_point is not None:
            self._resume(self.resume_point)
        self.supervisor.start(self.state, self.resume_point)

    # --- data ------------------------------------------------------------------------------------

    def batches(self, dataset, start_step: int) -> ReplicaBatches:
        batch = self.cfg.run.batch
        return ReplicaBatches(dataset, global_batch=batch.global_batch_size, micro_batch=batch.micro_batch_size,
                              data_parallel_size=self.cfg.data_parallel,
                              data_parallel_rank=self.engine.grid.data_parallel_id, start_step=start_step)

    # --- checkpoints -----------------------------------------------------------------------------

    def _resume(self, point) -> None:
        checkpoint.load(self.engine, point, verify=self.cfg.run.checkpoint.verify)
        steps = self.cfg.run.train.steps
        if point.kind == "weights" or point.run_state is None:
            self.metrics.log("resume", 0, checkpoint=str(point.folder), kind=point.kind,
                             note="weights only: optimizer state, LR schedule and data position start afresh")
            self.metrics.say(f"starting from the weights of {point.folder} (optimizer, LR schedule and data "
                             f"position start afresh): {steps} steps to train")
            return
        self.state = RunState.from_saved(point.run_state)
        set_forward_passes(self.engine, self.state.micro_offset)
        self.metrics.log("resume", self.state.step, checkpoint=str(point.folder), kind=point.kind, tag=point.tag)
        remaining = max(0, steps - self.state.step)
        self.metrics.say(f"resumed from {point.folder} ({point.kind} checkpoint: weights, optimizer, LR schedule, "
                         f"data position) at step {self.state.step} of {steps}: {remaining} steps remain")

    def save(self) -> None:
        self.state.micro_offset = forward_passes(self.engine)
        health, self.state = self.supervisor.before_save(self.state)
        step = self.state.step
        path = checkpoint.save(self.engine, self.cfg.run.train.save_dir, step, self.state.client_state(self.cfg),
                               health=health, in_publish_gap=lambda: self.supervisor.in_publish_gap(step))
        self.metrics.log("checkpoint", step, path=str(path), healthy=health["healthy"])
        self.supervisor.after_save(path, step)

    # --- steps -----------------------------------------------------------------------------------

    def _recomputed_layers(self) -> int:
        """Decoder layers, over all stages, whose forward DeepSpeed re-runs in the backward pass."""
        count = torch.tensor(recomputed_decoder_layers(self.engine.module), dtype=torch.long)
        dist.all_reduce(count, group=self.engine.grid.get_pipe_parallel_group())
        return int(count)

    def train_step(self, batches) -> dict:
        self.supervisor.before_step(self.state)
        lr = self.engine.get_lr()[0]
        started = time.perf_counter()
        loss = self.engine.train_batch(batches).item()
        seconds = time.perf_counter() - started
        self.state.step += 1
        return self.step_metrics(loss, lr, seconds)

    def step_metrics(self, loss: float, lr: float, seconds: float) -> dict:
        run = self.cfg.run
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            **self.throughput(seconds),
            "peak_memory_gib": peak_memory_gib(),
        }
        loss_scale = getattr(self.engine.optimizer, "cur_scale", None) if run.precision.dtype == "fp16" else None
        if loss_scale is not None:
            record["loss_scale"] = float(loss_scale)
        record["skipped_steps"] = int(self.engine.skipped_steps)
        return record

    def throughput(self, seconds: float) -> dict:
        """Speed figures of an optimizer step that took `seconds`."""
        shape, batch, seq = self.cfg.shape, self.cfg.run.batch.global_batch_size, self.cfg.run.batch.seq_length
        return {
            "step_seconds": seconds,
            "tokens_per_second": batch * seq / seconds,
            "model_tflops_per_gpu": flops.model_flops(shape, batch, seq).flops / seconds / self.world_size / 1e12,
            "hardware_tflops_per_gpu": flops.hardware_flops(shape, batch, seq, self.recomputed_layers).flops
            / seconds / self.world_size / 1e12,
        }

    def interval_record(self, interval: list, started: float, first_step: int) -> dict:
        """The logged record of the steps since the last log line: the last step's figures, with the loss and
        the speed averaged over the interval, plus progress (consumed data, elapsed time, ETA)."""
        run, step = self.cfg.run, self.state.step
        last = interval[-1]
        elapsed = time.perf_counter() - started
        done = max(1, step - first_step)
        return {**last,
                "loss": sum(r["loss"] for r in interval) / len(interval),
                "loss_steps": len(interval),
                "step_loss": last["loss"],
                **self.throughput(sum(r["step_seconds"] for r in interval) / len(interval)),
                "steps_total": run.train.steps,
                "consumed_samples": step * run.batch.global_batch_size,
                "consumed_tokens": step * run.batch.global_batch_size * run.batch.seq_length,
                "elapsed_seconds": elapsed,
                "eta_seconds": elapsed / done * max(0, run.train.steps - step)}

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
        if self.cfg.run.data.train:
            from opt_ds.data.datasets import describe_split
            data = self.cfg.run.data
            self.metrics.log("data_split", self.state.step, validation_samples=validation_samples(self.cfg),
                             corpora=describe_split([(e.path, e.weight) for e in data.train], data.split,
                                                    data.split_seed))
        if self.state.step >= train.steps:
            return self.already_done()
        if train.eval_interval and self.state.step == 0:
            self.evaluate()
        batches = self.batches(self.train_data, self.state.data_step)
        last, interval = {}, []
        started, first_step = time.perf_counter(), self.state.step
        while self.state.step < train.steps:
            last = self.train_step(batches)
            interval.append(last)
            # collective: every rank takes the same decision
            verdict = self.supervisor.after_step(self.state.step, last)
            step = self.state.step
            if step % train.log_interval == 0 or step == train.steps or verdict.diverged or verdict.stop:
                self.metrics.log("train", step, **self.interval_record(interval, started, first_step))
                interval = []
            if verdict.diverged:
                self.state = self.supervisor.recover(self.state, verdict)   # or raises TrainingDiverged
                batches = self.batches(self.train_data, self.state.data_step)
                continue
            if verdict.stop:
                return self.stop(verdict, last)
            if train.eval_interval and step % train.eval_interval == 0 and step != train.steps:
                self.evaluate()
            if self.downstream is not None and self.downstream.interval and step % self.downstream.interval == 0 \
                    and step != train.steps:
                self.downstream(self.engine, step, self.metrics)
            if train.save_dir and train.save_interval and step % train.save_interval == 0 and step != train.steps:
                self.save()
        if train.eval_interval:
            last["eval"] = self.evaluate()
        if self.downstream is not None:
            self.downstream(self.engine, self.state.step, self.metrics)
        if train.save_dir:
            self.save()
        if self.cfg.run.sample.prompt:
            self.sample()
        self.metrics.log("end", self.state.step)
        self.close()
        return last

    def already_done(self) -> dict:
        """Asked to train a run that has reached train.steps: say so, and do nothing else."""
        train = self.cfg.run.train
        where = self.resume_point.folder if self.resume_point is not None else "the run"
        self.metrics.say(f"nothing to train: {where} is at step {self.state.step} and "
                         f"train.steps={train.steps}. To train further, raise it (e.g. train.steps="
                         f"{2 * train.steps or 10}); to start a new run, set another train.save_dir")
        self.metrics.log("end", self.state.step, trained_steps=0)
        self.close()
        return {}

    def stop(self, verdict, last: dict) -> dict:
        """A stop signal reached some rank: save this step and return (the CLI exits 0)."""
        if self.cfg.run.train.save_dir:
            self.save()
        self.supervisor.stopped(self.state.step, verdict)
        self.close()
        return last

    def close(self) -> None:
        self.metrics.close()
        self.supervisor.close()
        if self.save_lock is not None:
            self.save_lock.release()
