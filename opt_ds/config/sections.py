"""The sections of a run config, as dataclasses: every key a YAML config may set, with its default."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from opt_ds.errors import UserError
from opt_ds.models.family import (DECODER_PARTITION_METHOD, ModelFamily, family_named, family_of_preset,
                                  get_preset)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says what is wrong and how to fix it."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    family: Optional[str] = None                # opt | llama; implied by the preset, else opt
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
    num_kv_heads: Optional[int] = None          # llama: grouped-query attention (default: num_heads)
    rope_theta: Optional[float] = None          # llama: rotary base (10000; Llama 3: 500000)
    rms_norm_eps: Optional[float] = None        # llama: 1e-6 (Llama 2: 1e-5)

    def model_family(self) -> ModelFamily:
        try:
            implied = family_of_preset(self.preset) if self.preset is not None else None
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from None
        try:
            named = family_named(self.family) if self.family is not None else None
        except ValueError as err:
            raise ConfigError(f"model.family: {err}") from None
        if implied and named and implied is not named:
            raise ConfigError(f"model.family {self.family} disagrees with model.preset {self.preset} "
                              f"(a {implied.name} model); drop model.family or pick a {self.family} preset")
        return implied or named or family_named("opt")

    def shape(self):
        family = self.model_family()
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in ("preset", "family") and getattr(self, f.name) is not None}
        foreign = sorted(set(overrides) - family.shape_fields())
        if foreign:
            raise ConfigError(f"model.{foreign[0]} is not a setting of the {family.name} family; remove it "
                              f"(or set model.family / model.preset to a family that has it)")
        missing = [k for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size") if k not in overrides]
        if self.preset is None and missing:
            raise ConfigError(f"model: set model.preset (e.g. opt-125m) or all of {', '.join(missing)}")
        try:
            if self.preset is not None:
                return get_preset(self.preset).shape.replace(**overrides)
            return family.shape_type(**overrides)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    data: Any = "auto"                          # an int, or "auto": whatever TP x PP leaves of the world
    zero_stage: int = 1
    activation_checkpoint_interval: int = 0     # decoder layers per checkpointed block; 0 = off
    partition_method: str = DECODER_PARTITION_METHOD    # DeepSpeed regex on layer class names


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
    tokenizer: Optional[str] = None             # "opt", a tokenizer.json, or a folder with vocab.json + merges.txt


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
