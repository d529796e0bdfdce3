"""Typed run configuration, loaded from YAML with `key=value` overrides.

Strict by design: an unknown key, a wrong type or an impossible combination raises ConfigError with a
message that names the key and the fix, before any process group exists. Every derived number
(gradient accumulation, DP degree, the DeepSpeed JSON) is computed here once.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from opt_ds.errors import UserError

from opt_ds.models.presets import OPTShape, get_preset


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says what is wrong and how to fix it."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    word_embed_proj_dim: Optional[int] = None
    pre_layer_norm: Optional[bool] = None
    dropout: Optional[float] = None
    attention_dropout: Optional[float] = None
    init_std: Optional[float] = None

    def shape(self) -> OPTShape:
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name != "preset" and getattr(self, f.name) is not None}
        if self.preset is not None:
            try:
                return get_preset(self.preset).shape.replace(**overrides)
            except ValueError as err:
                raise ConfigError(f"model.preset: {err}") from None
        missing = [k for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size") if k not in overrides]
        if missing:
            raise ConfigError(f"model: set model.preset (e.g. opt-125m) or all of {', '.join(missing)}")
        return OPTShape(**overrides)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    data: Any = "auto"                          # an int, or "auto": whatever TP x PP leaves of the world
    zero_stage: int = 1
    activation_checkpoint_interval: int = 0     # decoder layers per checkpointed block; 0 = off
    partition_method: str = "type:OPTDecoderLayer"


@dataclass
class BatchConfig:
    global_batch_size: int = 8                  # sequences per optimizer step, all replicas together
    micro_batch_size: int = 1                   # sequences per forward pass on one replica
    seq_length: int = 2048
    gradient_accumulation_steps: Optional[int] = None   # derived when omitted


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"                         # fp32 | bf16 | fp16
    initial_scale_power: int = 16               # fp16 dynamic loss scaling
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class OptimizerConfig:
    lr: float = 6.0e-4
    min_lr_ratio: float = 0.1                   # OPT decays linearly to 10% of the peak
    schedule: str = "linear"                    # linear | cosine | constant
    warmup_steps: int = 0
    decay_steps: Optional[int] = None           # defaults to train.steps
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class BlendEntry:
    path: str                                   # prefix of a .bin/.idx pair
    weight: float = 1.0


@dataclass
class DataConfig:
    train: typing.List[BlendEntry] = field(default_factory=list)   # empty: synthetic tokens (see below)
    synthetic: str = "random"                   # random | arithmetic (learnable), used when train is empty
    split: str = "98,2,0"                       # train,valid,test per mille of each corpus
    cache_dir: Optional[str] = None
    tokenizer: Optional[str] = None             # "opt" or a folder with vocab.json + merges.txt (for samples)


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0                      # 0 = no periodic validation
    eval_iters: int = 2
    save_interval: int = 0                      # 0 = save only at the end (when save_dir is set)
    save_dir: Optional[str] = None
    load_dir: Optional[str] = None              # resume from here; defaults to save_dir when it has a checkpoint
    load_tag: Optional[str] = None              # resume from this checkpoint (e.g. global_step30), not `latest`
    log_dir: Optional[str] = None               # metrics.jsonl (+ TensorBoard) go here
    tensorboard: bool = True


@dataclass
class SampleConfig:
    prompt: Optional[str] = None                # text continued at the end of training (needs a tokenizer)
    max_new_tokens: int = 48
    top_p: float = 0.9                          # 0 = greedy
    temperature: float = 0.8
    seed: int = 0


@dataclass
class HealthConfig:
    """Per-step divergence detection (docs/fault-tolerance.md)."""
    enabled: bool = True
    spike_factor: float = 1.5                   # loss > factor x EWM mean of past losses is a spike
    ewm_window: int = 50                        # span of the EWM mean, in steps (alpha = 2 / (window + 1))
    spike_warmup_steps: int = 100               # steps of EWM history before spikes are judged
    spike_patience: int = 1                     # consecutive spiking steps that make a divergence
    min_loss_scale: float = 1.0                 # fp16: a scale below this has collapsed (OPT's healthy rule)
    replica_check: bool = True                  # compare the DP replicas' own gradient norms (DP > 1)
    replica_norm_ratio: float = 10.0            # largest / smallest replica norm above this: a bad host


@dataclass
class RecoveryConfig:
    """What to do on a divergence: roll back to the last healthy checkpoint and retry."""
    enabled: bool = True
    max_retries: int = 3                        # rollbacks in a row before a new healthy checkpoint; then exit 3
    lr_factor: float = 0.7                      # peak LR multiplier per rollback (cumulative, persistent)
    clip_grad: Optional[float] = None           # gradient clipping after a rollback (OPT: 1.0 -> 0.3)
    skip_data: bool = True                      # skip the data consumed from the checkpoint to the detection


@dataclass
class CheckpointConfig:
    keep_last: int = 0                          # keep the newest K checkpoints; 0 keeps every checkpoint
    keep_every: int = 0                         # with keep_last: also keep steps that are multiples of M
    verify: str = "sha256"                      # check files against the manifest on load: sha256 | size | none


@dataclass
class FaultsConfig:
    """Fault injection for tests. Armed only with OPT_DS_FAULT_INJECTION=1 in the environment."""
    nan_at_step: Optional[int] = None           # a weight becomes NaN before this optimizer step (once)
    persistent: bool = False                    # nan_at_step fires every time the step is reached
    spike_at_step: Optional[int] = None         # the batch of this data step makes a 100x-LR update
    kill_during_save_at_step: Optional[int] = None   # `rank` dies (os._exit) half-way through a file
    corrupt_checkpoint_at_step: Optional[int] = None  # truncate a file of this checkpoint after it is published
    bad_replica_at_step: Optional[int] = None   # `rank`'s local gradients are scaled 1000x (a silent bad host)
    rank: int = -1                              # the rank the kill / bad-replica faults hit; -1 = the last

    def armed(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.endswith("_step") and getattr(self, f.name) is not None}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    deepspeed: Optional[str] = None             # a DeepSpeed JSON to check against this config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------------

def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:                  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):          # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls, values, where: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key {path!r}{_closest(key, names)}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _parse_scalar(text)
    return raw


def load_config(path=None, overrides=(), world_size: Optional[int] = None) -> "ResolvedConfig":
    """Read a YAML config (None or "-": no file, defaults) and apply `section.key=value` overrides."""
    raw: dict = {}
    if path is not None and str(path) != "-":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file such as "
                              "ds_configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, parallel:, ...)")
        if isinstance(raw.get("deepspeed"), str) and not Path(raw["deepspeed"]).is_absolute():
            raw["deepspeed"] = str(path.parent / raw["deepspeed"])    # relative to the YAML file
    raw = apply_overrides(raw, overrides)
    return resolve(build_dataclass(RunConfig, raw), world_size)


# --- resolution and validation ---------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedConfig:
    """A validated RunConfig plus everything derived from it once."""
    run: RunConfig
    shape: OPTShape
    tensor: int
    pipeline: int
    data: int
    gradient_accumulation_steps: int

    @property
    def layout(self):
        from opt_ds.parallel.layout import ParallelLayout
        return ParallelLayout(self.tensor, self.pipeline, self.data)

    def deepspeed_config(self) -> dict:
        generated = deepspeed_config(self)
        return merge_deepspeed_json(generated, self.run.deepspeed) if self.run.deepspeed else generated


def resolve(run: RunConfig, world_size: Optional[int] = None) -> ResolvedConfig:
    shape = run.model.shape()
    par, batch = run.parallel, run.batch
    tp, pp = par.tensor, par.pipeline
    for name, value in (("parallel.tensor", tp), ("parallel.pipeline", pp)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if shape.hidden_size % shape.num_heads:
        raise ConfigError(f"model.hidden_size {shape.hidden_size} is not divisible by model.num_heads "
                          f"{shape.num_heads}")
    if shape.num_heads % tp:
        raise ConfigError(f"model.num_heads {shape.num_heads} is not divisible by parallel.tensor {tp}; "
                          f"choose a tensor-parallel degree that divides the heads "
                          f"({', '.join(str(d) for d in range(1, shape.num_heads + 1) if shape.num_heads % d == 0)})")
    if shape.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size {shape.ffn_hidden_size} is not divisible by parallel.tensor {tp}")
    if shape.vocab_size % tp:
        raise ConfigError(f"model.vocab_size {shape.vocab_size} is not divisible by parallel.tensor {tp}; "
                          f"pad the vocabulary to a multiple of {tp} (OPT's 50272 divides 1, 2, 4, 8, 16, 32)")
    if shape.num_layers < pp:
        raise ConfigError(f"model.num_layers {shape.num_layers} is fewer than parallel.pipeline {pp} stages; "
                          f"use at most {shape.num_layers} pipeline stages")
    if par.zero_stage not in (0, 1):
        raise ConfigError(f"parallel.zero_stage {par.zero_stage}: DeepSpeed's pipeline engine supports ZeRO "
                          "stage 0 or 1 only")
    if par.activation_checkpoint_interval < 0:
        raise ConfigError("parallel.activation_checkpoint_interval must be >= 0")

    dp = _data_parallel_degree(par.data, tp, pp, world_size)
    micro, global_batch = batch.micro_batch_size, batch.global_batch_size
    if micro < 1 or global_batch < 1:
        raise ConfigError("batch.micro_batch_size and batch.global_batch_size must be >= 1")
    if batch.gradient_accumulation_steps is not None:
        gas = batch.gradient_accumulation_steps
        if micro * gas * dp != global_batch:
            raise ConfigError(
                f"batch.global_batch_size {global_batch} != micro_batch_size {micro} x "
                f"gradient_accumulation_steps {gas} x data-parallel degree {dp} = {micro * gas * dp}; "
                f"fix one of them or drop gradient_accumulation_steps to derive it")
    else:
        if global_batch % (micro * dp):
            raise ConfigError(
                f"batch.global_batch_size {global_batch} is not a multiple of micro_batch_size {micro} x "
                f"data-parallel degree {dp} = {micro * dp}; use e.g. {max(1, global_batch // (micro * dp)) * micro * dp}")
        gas = global_batch // (micro * dp)
    if batch.seq_length > shape.max_position_embeddings:
        raise ConfigError(f"batch.seq_length {batch.seq_length} exceeds model.max_position_embeddings "
                          f"{shape.max_position_embeddings}")
    if run.precision.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision.dtype {run.precision.dtype!r}: choose fp32, bf16 or fp16")
    if run.data.synthetic not in ("random", "arithmetic"):
        raise ConfigError(f"data.synthetic {run.data.synthetic!r}: choose random or arithmetic")
    if run.optimizer.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optimizer.schedule {run.optimizer.schedule!r}: choose linear, cosine or constant")
    if len(run.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas must be two numbers, got {run.optimizer.betas}")
    _check_fault_tolerance(run, tp * pp * dp)
    resolved = ResolvedConfig(run, shape, tp, pp, dp, gas)
    resolved.deepspeed_config()         # a disagreeing DeepSpeed JSON fails now, not at engine start
    return resolved


FAULT_INJECTION_ENV = "OPT_DS_FAULT_INJECTION"


def _check_fault_tolerance(run: RunConfig, world_size: int) -> None:
    health, recovery, ckpt = run.health, run.recovery, run.checkpoint
    if health.spike_factor <= 1.0:
        raise ConfigError(f"health.spike_factor {health.spike_factor} must be > 1 (a spike is a loss this many "
                          "times the recent mean; e.g. 1.5)")
    if health.ewm_window < 1 or health.spike_warmup_steps < 0 or health.spike_patience < 1:
        raise ConfigError("health.ewm_window and health.spike_patience must be >= 1, health.spike_warmup_steps >= 0")
    if health.min_loss_scale <= 0 or health.replica_norm_ratio <= 1.0:
        raise ConfigError("health.min_loss_scale must be > 0 and health.replica_norm_ratio > 1")
    if not 0.0 < recovery.lr_factor <= 1.0:
        raise ConfigError(f"recovery.lr_factor {recovery.lr_factor} must be in (0, 1]: the peak LR is multiplied "
                          "by it at every rollback (1 keeps the LR)")
    if recovery.max_retries < 0:
        raise ConfigError("recovery.max_retries must be >= 0")
    if recovery.clip_grad is not None and recovery.clip_grad <= 0:
        raise ConfigError(f"recovery.clip_grad {recovery.clip_grad} must be > 0 (or null to keep optimizer.clip_grad)")
    if ckpt.keep_last < 0 or ckpt.keep_every < 0:
        raise ConfigError("checkpoint.keep_last and checkpoint.keep_every must be >= 0 (0: keep all / off)")
    if ckpt.verify not in ("sha256", "size", "none"):
        raise ConfigError(f"checkpoint.verify {ckpt.verify!r}: choose sha256, size or none")
    armed = run.faults.armed()
    if armed and os.environ.get(FAULT_INJECTION_ENV) != "1":
        raise ConfigError(f"faults: {', '.join(f'{k}={v}' for k, v in armed.items())} would deliberately break this "
                          f"run; fault injection is for tests and is armed only when the environment sets "
                          f"{FAULT_INJECTION_ENV}=1. Remove the faults section from this config")
    for name, step in armed.items():
        if step < 1:
            raise ConfigError(f"faults.{name} must be a step >= 1, got {step}")
    if not -world_size <= run.faults.rank < world_size:
        raise ConfigError(f"faults.rank {run.faults.rank} is not a rank of this {world_size}-process world")


def _data_parallel_degree(data, tp: int, pp: int, world_size: Optional[int]) -> int:
    if data == "auto":
        if world_size is None:
            return 1
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp}; launch a "
                              f"multiple of {tp * pp} processes")
        return world_size // (tp * pp)
    if not isinstance(data, int) or isinstance(data, bool) or data < 1:
        raise ConfigError(f"parallel.data must be a positive integer or 'auto', got {data!r}")
    if world_size is not None and world_size != tp * pp * data:
        raise ConfigError(f"world size {world_size} != TP x PP x DP = {tp} x {pp} x {data} = {tp * pp * data}; "
                          f"launch {tp * pp * data} processes or set parallel.data=auto")
    return data


# --- DeepSpeed JSON ----------------------------------------------------------------------------------

def deepspeed_config(cfg: ResolvedConfig) -> dict:
    """The DeepSpeed JSON for this run, derived from the typed config (never written by hand)."""
    run = cfg.run
    prec = run.precision
    ds = {
        "train_batch_size": run.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": run.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": run.optimizer.clip_grad,
        "zero_optimization": {"stage": run.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": prec.dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": prec.initial_scale_power, "loss_scale_window": prec.loss_scale_window,
                 "hysteresis": prec.hysteresis, "min_loss_scale": prec.min_loss_scale},
        "bf16": {"enabled": prec.dtype == "bf16"},
        "pipeline": {"activation_checkpoint_interval": run.parallel.activation_checkpoint_interval},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if prec.dtype == "bf16":
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


# Where the typed config sets each DeepSpeed key, for error messages.
_SOURCE_OF = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.gradient_accumulation_steps",
    "gradient_clipping": "optimizer.clip_grad",
    "zero_optimization.stage": "parallel.zero_stage",
    "fp16.enabled": "precision.dtype", "bf16.enabled": "precision.dtype",
    "pipeline.activation_checkpoint_interval": "parallel.activation_checkpoint_interval",
}


def _merge(ours: dict, given: dict, prefix: str, problems: list) -> dict:
    merged = dict(ours)
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, f"{dotted}.", problems)
        elif ours[key] != value:
            problems.append(f"{dotted}={value!r} but the config gives {ours[key]!r} "
                            f"({_SOURCE_OF.get(dotted, 'generated by opt_ds')})")
    return merged


def merge_deepspeed_json(generated: dict, path: str) -> dict:
    """Merge a hand-written DeepSpeed JSON into the generated one. Keys the typed config sets must agree;
    keys it does not know (e.g. comms_logger) are taken from the JSON."""
    try:
        given = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed: {path!r} does not exist; remove the key to use the generated JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed: {path!r} is not valid JSON ({err})") from None
    problems = []
    merged = _merge(generated, given, "", problems)
    if problems:
        raise ConfigError(f"deepspeed JSON {path} disagrees with the config: " + "; ".join(problems)
                          + ". Change one of them so they agree, or drop the JSON and use the generated one")
    return merged
