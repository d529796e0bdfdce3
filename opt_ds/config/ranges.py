"""The valid values of every config key, declared once per field and checked in one place (`check_ranges`).

Every numeric field of every section has a declaration here (a test keeps it so); the checks run on the
RunConfig as loaded, before anything is derived from it and long before any process group exists. Checks
that relate several keys (divisibility, world size, batch arithmetic) live in resolve.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from opt_ds.config.sections import (BatchConfig, BlendEntry, CheckpointConfig, ConfigError, DataConfig, FaultsConfig,
                                    HealthConfig, ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig,
                                    RecoveryConfig, RunConfig, SampleConfig, TrainConfig, WandbConfig, EvalConfig)


@dataclass(frozen=True)
class Range:
    """low <= value <= high (either bound may be open or absent); `fix` completes the message."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    fix: str = ""

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"

    def problem(self, key: str, value) -> Optional[str]:
        if self.holds(value):
            return None
        return f"{key} {value!r} must be {self.describe()}: {self.fix}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple
    fix: str = ""

    def problem(self, key: str, value) -> Optional[str]:
        if value in self.choices:
            return None
        names = [str(c) for c in self.choices]
        listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
        return f"{key} {value!r}: choose {listed}" + (f" ({self.fix})" if self.fix else "")


@dataclass(frozen=True)
class Folder:
    """A directory path: it may not exist yet, but it must not be an existing file."""
    fix: str = ""

    def problem(self, key: str, value) -> Optional[str]:
        if Path(value).exists() and not Path(value).is_dir():
            return f"{key} {value!r} is a file, not a folder: {self.fix}"
        return None


@dataclass(frozen=True)
class Unchecked:
    """Any value of the field's type is valid here; `why` says where (if anywhere) it is checked."""
    why: str

    def problem(self, key: str, value) -> Optional[str]:
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(low, fix: str) -> Range:
    return Range(low=low, fix=fix)


def positive(fix: str) -> Range:
    return Range(low=0, low_open=True, fix=fix)


def fraction(fix: str, high_open: bool = False) -> Range:
    return Range(low=0, high=1, high_open=high_open, fix=fix)


STEP = "a step number >= 1, or null to disarm this fault"

RANGES = {
    ModelConfig: {
        "num_layers": at_least(1, "the number of decoder layers, e.g. model.num_layers=12 (opt-125m)"),
        "hidden_size": at_least(1, "the model width, a multiple of model.num_heads, e.g. model.hidden_size=768"),
        "num_heads": at_least(1, "the attention heads per layer, e.g. model.num_heads=12 (opt-125m)"),
        "ffn_hidden_size": at_least(1, "the MLP width, usually 4 x hidden_size, e.g. model.ffn_hidden_size=3072"),
        "vocab_size": at_least(1, "the tokenizer's vocabulary, padded; OPT's is model.vocab_size=50272"),
        "max_position_embeddings": at_least(1, "the longest sequence the model can see, e.g. 2048"),
        "word_embed_proj_dim": at_least(1, "the embedding width when it differs from hidden_size (opt-350m: 512), "
                                           "or null"),
        "dropout": fraction("a probability; OPT trains with model.dropout=0.1", high_open=True),
        "attention_dropout": fraction("a probability; OPT trains with model.attention_dropout=0.0", high_open=True),
        "init_std": positive("the standard deviation of the initial weights; OPT uses model.init_std=0.006"),
        "num_kv_heads": at_least(1, "llama: the key/value heads of grouped-query attention, dividing model.num_heads "
                                    "(Llama 2 70B: 8), or null for one per head"),
        "rope_theta": positive("llama: the rotary base, e.g. model.rope_theta=10000 (Llama 3: 500000)"),
        "rms_norm_eps": positive("llama: RMSNorm's epsilon, e.g. model.rms_norm_eps=1e-6"),
    },
    ParallelConfig: {
        "tensor": at_least(1, "the tensor-parallel degree; 1 turns tensor parallelism off"),
        "pipeline": at_least(1, "the number of pipeline stages; 1 turns pipelining off"),
        "data": Unchecked("an int >= 1 or 'auto', checked with the world size in resolve.py"),
        "zero_stage": Range(0, 1, fix="DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"),
        "activation_checkpoint_interval": at_least(0, "decoder layers per recomputed block; 0 turns it off"),
        "recompute": OneOf(("none", "selective", "full"),
                           fix="selective recomputes only the attention core, full every decoder layer"),
    },
    BatchConfig: {
        "global_batch_size": at_least(1, "sequences per optimizer step, e.g. batch.global_batch_size=8"),
        "micro_batch_size": at_least(1, "sequences per forward pass on one replica, e.g. batch.micro_batch_size=1"),
        "seq_length": at_least(1, "tokens per sequence, at most model.max_position_embeddings, e.g. "
                                  "batch.seq_length=2048"),
        "gradient_accumulation_steps": at_least(1, "micro-batches per step, or null to derive it"),
    },
    PrecisionConfig: {
        "dtype": OneOf(("fp32", "bf16", "fp16")),
        "grad_accumulation": OneOf(("immediate", "separate"), fix="DeepSpeed's bf16.immediate_grad_update on or off"),
        "initial_scale_power": Range(0, 64, fix="the fp16 loss scale starts at 2**power; DeepSpeed's default is 16"),
        "loss_scale_window": at_least(1, "steps without overflow before the fp16 scale grows, e.g. 1000"),
        "hysteresis": at_least(1, "overflows tolerated before the fp16 scale shrinks, e.g. 2"),
        "min_loss_scale": positive("the smallest fp16 loss scale, e.g. precision.min_loss_scale=1"),
    },
    OptimizerConfig: {
        "lr": positive("the peak learning rate, e.g. optimizer.lr=6e-4 (opt-125m)"),
        "min_lr_ratio": fraction("the final LR as a fraction of the peak; OPT decays to 0.1"),
        "warmup_steps": at_least(0, "steps of linear warm-up; 0 turns it off"),
        "decay_steps": at_least(1, "steps of LR decay, or null for train.steps"),
        "betas": Range(0, 1, high_open=True, fix="Adam's two decay rates, e.g. optimizer.betas=[0.9, 0.95]"),
        "eps": positive("Adam's epsilon, e.g. optimizer.eps=1e-8"),
        "weight_decay": at_least(0, "e.g. optimizer.weight_decay=0.1; 0 turns it off"),
        "clip_grad": at_least(0, "the gradient-norm clipping threshold, e.g. optimizer.clip_grad=1.0; 0 turns it off"),
        "schedule": OneOf(("linear", "cosine", "constant")),
    },
    BlendEntry: {
        "weight": positive("the share of this dataset in the blend, e.g. weight: 1.0"),
    },
    DataConfig: {
        "synthetic": OneOf(("random", "arithmetic")),
        "split_seed": Range(0, 2 ** 32 - 1, fix="a non-negative 32-bit integer that shuffles the documents before "
                                                 "the split, e.g. data.split_seed=1234"),
        "train": Unchecked("checked in resolve.py (not empty) and before training (the files)"),
    },
    TrainConfig: {
        "steps": at_least(1, "the number of optimizer steps to train, e.g. train.steps=100"),
        "seed": Range(0, 2 ** 32 - 1, fix="a non-negative 32-bit integer, e.g. train.seed=1234"),
        "log_interval": at_least(1, "log every N steps, e.g. train.log_interval=1"),
        "eval_interval": at_least(0, "validate every N steps; 0 validates only at the end (if at all)"),
        "eval_iters": at_least(1, "validation batches per evaluation, e.g. train.eval_iters=2"),
        "save_interval": at_least(0, "save every N steps; 0 saves only at the end"),
        "save_dir": Folder("name a folder for the checkpoints (it is created if missing)"),
        "load_dir": Folder("name the train.save_dir folder of the run to resume from"),
        "log_dir": Folder("name a folder for metrics.jsonl (it is created if missing)"),
    },
    EvalConfig: {
        "num_fewshot": at_least(0, "examples shown before each question, e.g. eval.num_fewshot=0, or null for each "
                                   "task's default"),
        "limit": at_least(1, "documents per task, e.g. eval.limit=100, or null for all"),
        "interval": at_least(0, "steps between downstream evaluations; 0 follows train.eval_interval"),
    },
    WandbConfig: {
        "mode": OneOf(("online", "offline", "disabled"), "offline writes files only, for `wandb sync` later"),
    },
    SampleConfig: {
        "max_new_tokens": at_least(1, "tokens to generate after the prompt, e.g. sample.max_new_tokens=48"),
        "top_p": fraction("the nucleus mass, e.g. sample.top_p=0.9; 0 is greedy"),
        "temperature": positive("e.g. sample.temperature=0.8; lower is more deterministic"),
        "seed": Range(0, 2 ** 63 - 1, fix="a non-negative integer, e.g. sample.seed=0"),
    },
    HealthConfig: {
        "spike_sigmas": positive("a spike rises above the recent median by this many noise sigmas, e.g. "
                                 "health.spike_sigmas=8"),
        "spike_min_rise": at_least(0, "a spike also rises by this fraction of the recent median, e.g. "
                                      "health.spike_min_rise=0.05"),
        "spike_window": at_least(3, "the healthy losses kept to judge spikes by, e.g. health.spike_window=50"),
        "spike_warmup_steps": at_least(3, "healthy losses needed before spikes are judged (the noise needs a few), "
                                          "at most health.spike_window, e.g. 10"),
        "spike_patience": at_least(1, "consecutive spiking steps that make a divergence, e.g. 1"),
        "min_loss_scale": positive("an fp16 loss scale below this has collapsed, e.g. health.min_loss_scale=1"),
        "replica_norm_ratio": Range(1, low_open=True, fix="the largest / smallest replica gradient norm that flags "
                                                          "a bad host, e.g. 10"),
    },
    RecoveryConfig: {
        "max_retries": at_least(0, "rollbacks in a row before giving up, e.g. recovery.max_retries=3"),
        "lr_factor": Range(0, 1, low_open=True, fix="the peak LR is multiplied by it at every rollback "
                                                    "(1 keeps the LR)"),
        "clip_grad": positive("the clipping after a rollback (OPT: 0.3), or null to keep optimizer.clip_grad"),
    },
    CheckpointConfig: {
        "keep_last": at_least(0, "the newest checkpoints to keep; 0 keeps every checkpoint"),
        "keep_every": at_least(0, "with keep_last, also keep steps that are multiples of this; 0 is off"),
        "verify": OneOf(("sha256", "size", "none")),
    },
    FaultsConfig: {
        "nan_at_step": at_least(1, STEP),
        "spike_at_step": at_least(1, STEP),
        "kill_during_save_at_step": at_least(1, STEP),
        "kill_in_publish_gap_at_step": at_least(1, STEP),
        "corrupt_checkpoint_at_step": at_least(1, STEP),
        "bad_replica_at_step": at_least(1, STEP),
        "rank": Unchecked("a rank of the world, checked with the world size in resolve.py"),
    },
}


def _problems(obj, where: str):
    declared = RANGES.get(type(obj), {})
    for f in dataclasses.fields(obj):
        value: Any = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            yield from _problems(value, key)
            continue
        if value is None or f.name not in declared:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _problems(item, f"{key}[{i}]")
                elif (problem := declared[f.name].problem(f"{key}[{i}]", item)) is not None:
                    yield problem
        elif (problem := declared[f.name].problem(key, value)) is not None:
            yield problem


def check_ranges(run: RunConfig) -> None:
    """Raise ConfigError for the first value outside its declared range (the message names key and fix)."""
    for problem in _problems(run, ""):
        raise ConfigError(problem)
