"""The sections of a run config, as dataclasses: every key a YAML config may set, with its default."""
from __future__ import annotations

import dataclasses
import importlib.util
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
    preset: Optional[str] = None                # a named shape: opt-125m ... opt-175b, llama-7b ... llama2-70b; the fields below override it
    family: Optional[str] = None                # opt | llama; implied by the preset, else opt
    num_layers: Optional[int] = None            # decoder layers
    hidden_size: Optional[int] = None           # model width h
    num_heads: Optional[int] = None             # attention heads; divisible by parallel.tensor
    ffn_hidden_size: Optional[int] = None       # inner width of the MLP (OPT: 4h; LLaMA: SwiGLU width)
    vocab_size: Optional[int] = None            # embedding rows (OPT: 50272 = 50265 padded; LLaMA: 32000)
    max_position_embeddings: Optional[int] = None# longest sequence (OPT: learned positions, 2048); at least batch.seq_length
    word_embed_proj_dim: Optional[int] = None   # opt: embedding width if not hidden_size (opt-350m: 512)
    pre_layer_norm: Optional[bool] = None       # opt: LayerNorm before attention/MLP (true for every OPT but opt-350m)
    dropout: Optional[float] = None             # dropout on residual branches (OPT: 0.1; none on embeddings)
    attention_dropout: Optional[float] = None   # dropout on attention probabilities
    init_std: Optional[float] = None            # std of the initial weights (OPT: 0.006; LLaMA: 0.02)
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
    tensor: int = 1                             # tensor-parallel degree (megatron-core layers; keep it inside a node)
    pipeline: int = 1                           # pipeline stages (DeepSpeed PipelineModule)
    data: Any = "auto"                          # an int, or "auto": whatever TP x PP leaves of the world
    zero_stage: int = 1                         # ZeRO stage over the data-parallel replicas: 0 or 1
    activation_checkpoint_interval: int = 0     # full recompute: decoder layers per checkpointed block; 0 = off
    recompute: Optional[str] = None             # none | selective (attention core only) | full; null: full if the interval is set
    sequence_parallel: bool = False             # TP > 1: norms, dropout and residual split along the sequence over TP ranks
    partition_method: str = DECODER_PARTITION_METHOD    # how DeepSpeed balances stages (regex on layer class names)

    def recompute_mode(self) -> str:
        """none | selective | full, with `recompute: null` read from activation_checkpoint_interval."""
        if self.recompute is None:
            return "full" if self.activation_checkpoint_interval > 0 else "none"
        return self.recompute

    def full_recompute_interval(self) -> int:
        """Decoder layers per block DeepSpeed recomputes whole (its pipeline `activation_checkpoint_interval`)."""
        if self.recompute_mode() != "full":
            return 0
        return self.activation_checkpoint_interval or 1


@dataclass
class BatchConfig:
    global_batch_size: int = 8                  # sequences per optimizer step, all replicas together
    micro_batch_size: int = 1                   # sequences per forward pass on one replica
    seq_length: int = 2048                      # tokens per sequence
    gradient_accumulation_steps: Optional[int] = None   # derived when omitted


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"                         # fp32 | bf16 | fp16
    grad_accumulation: str = "immediate"        # bf16: immediate (fp32 += bf16 gradient in backward hooks) | separate (a pass per micro-batch)
    initial_scale_power: int = 16               # fp16 dynamic loss scaling
    loss_scale_window: int = 1000               # fp16: overflow-free steps before the loss scale doubles
    hysteresis: int = 2                         # fp16: overflows tolerated before the loss scale halves
    min_loss_scale: float = 1.0                 # fp16: the loss scale never goes below this


@dataclass
class OptimizerConfig:
    lr: float = 6.0e-4                          # peak learning rate
    min_lr_ratio: float = 0.1                   # OPT decays linearly to 10% of the peak
    schedule: str = "linear"                    # linear | cosine | constant
    warmup_steps: int = 0                       # steps of linear warmup from 0 to lr
    decay_steps: Optional[int] = None           # defaults to train.steps
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.95])# AdamW beta1, beta2
    eps: float = 1.0e-8                         # AdamW epsilon
    weight_decay: float = 0.1                   # AdamW weight decay (not on biases and LayerNorms)
    clip_grad: float = 1.0                      # gradient clipping by global norm; 0 = off


@dataclass
class BlendEntry:
    path: str                                   # prefix of a .bin/.idx pair
    weight: float = 1.0                         # relative share of this corpus in the blend


@dataclass
class DataConfig:
    train: Optional[typing.List[BlendEntry]] = None   # null: synthetic tokens (see below)
    synthetic: str = "random"                   # random | arithmetic (learnable), used when train is empty
    split: str = "98,2,0"                       # train,valid,test per mille of each corpus
    split_seed: int = 1234                      # shuffles the documents before the split (docs/data.md)
    cache_dir: Optional[str] = None             # where megatron's dataset index caches go (default: beside the corpus)
    tokenizer: Optional[str] = None             # "opt", a tokenizer.json, or a folder with vocab.json + merges.txt


@dataclass
class WandbConfig:
    """Weights & Biases: on when `project` is set (needs `pip install 'opt_ds[wandb]'`)."""
    project: Optional[str] = None               # W&B project; None = no W&B
    entity: Optional[str] = None                # team or user (default: your W&B default entity)
    name: Optional[str] = None                  # run name (default: W&B picks one)
    mode: str = "online"                        # online | offline (files only, `wandb sync` later) | disabled
    dir: Optional[str] = None                   # where W&B writes its files (default: train.log_dir)

    def __post_init__(self):
        if self.project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.wandb.project is set but wandb is not installed; pip install "
                              "'opt_ds[wandb]' (or drop train.wandb)")


@dataclass
class TrainConfig:
    steps: int = 10                             # optimizer steps to train (the run's total, counting resumed steps)
    seed: int = 1234                            # seed of weights, data order and dropout
    log_interval: int = 1                       # steps per console/metrics line (loss and speed averaged over them)
    eval_interval: int = 0                      # 0 = no periodic validation
    eval_iters: int = 2                         # validation batches per evaluation
    save_interval: int = 0                      # 0 = save only at the end (when save_dir is set)
    save_dir: Optional[str] = None              # checkpoints go here; a run resumes from its own latest one
    load_dir: Optional[str] = None              # resume from here; defaults to save_dir when it has a checkpoint
    load_tag: Optional[str] = None              # resume from this checkpoint (e.g. global_step30), not `latest`
    log_dir: Optional[str] = None               # metrics.jsonl (+ TensorBoard) go here
    tensorboard: bool = True                    # also write TensorBoard events to <log_dir>/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)# Weights & Biases logging


@dataclass
class EvalConfig:
    """Downstream evaluation during training, on the live engine (docs/eval.md)."""
    tasks: typing.List[str] = field(default_factory=list)       # lm-evaluation-harness task names
    perplexity: typing.List[str] = field(default_factory=list)  # text/JSONL files or dataset prefixes
    include_path: typing.List[str] = field(default_factory=list)  # folders of extra task YAML files
    num_fewshot: Optional[int] = None           # None: each task's default (0 for most)
    limit: Optional[int] = None                 # documents per task; None: all
    interval: int = 0                           # steps between evaluations; 0: train.eval_interval (and the end)


@dataclass
class SampleConfig:
    prompt: Optional[str] = None                # text continued at the end of training (needs a tokenizer)
    max_new_tokens: int = 48                    # length of the sample
    top_p: float = 0.9                          # 0 = greedy
    temperature: float = 0.8                    # sampling temperature
    seed: int = 0                               # sampling seed


@dataclass
class HealthConfig:
    """Per-step divergence detection (docs/fault-tolerance.md)."""
    enabled: bool = True                        # check every step's loss and gradient norm
    spike_sigmas: float = 8.0                   # a spike: loss > median of the recent healthy losses + this x noise
    spike_min_rise: float = 0.05                # ... and + this fraction of that median (floor for smooth runs)
    spike_window: int = 50                      # healthy losses kept; their step-to-step changes give the noise
    spike_warmup_steps: int = 10                # healthy losses in the window before spikes are judged (>= 3)
    spike_patience: int = 1                     # consecutive spiking steps that make a divergence
    min_loss_scale: float = 1.0                 # fp16: a scale below this has collapsed (OPT's healthy rule)
    replica_check: bool = True                  # compare the DP replicas' own gradient norms (DP > 1)
    replica_norm_ratio: float = 10.0            # largest / smallest replica norm above this: a bad host


@dataclass
class RecoveryConfig:
    """What to do on a divergence: roll back to the last healthy checkpoint and retry."""
    enabled: bool = True                        # roll back on a divergence (off: stop with exit status 3)
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
    kill_in_publish_gap_at_step: Optional[int] = None  # re-saving this step, rank 0 dies between its two renames
    bad_replica_at_step: Optional[int] = None   # `rank`'s local gradients are scaled 1000x (a silent bad host)
    rank: int = -1                              # the rank the kill / bad-replica faults hit; -1 = the last

    def armed(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.endswith("_step") and getattr(self, f.name) is not None}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)# the model's shape
    parallel: ParallelConfig = field(default_factory=ParallelConfig)# TP x PP x DP layout and ZeRO
    batch: BatchConfig = field(default_factory=BatchConfig)# batch sizes and sequence length
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)# number format
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)# AdamW and the LR schedule
    data: DataConfig = field(default_factory=DataConfig)# training corpora
    train: TrainConfig = field(default_factory=TrainConfig)# steps, intervals, folders, dashboards
    eval: EvalConfig = field(default_factory=EvalConfig)# downstream tasks and perplexity during training
    sample: SampleConfig = field(default_factory=SampleConfig)# text sampled at the end of training
    health: HealthConfig = field(default_factory=HealthConfig)# divergence detection
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)# rollback on divergence
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)# retention and verification
    faults: FaultsConfig = field(default_factory=FaultsConfig)# fault injection (tests only)
    deepspeed: Optional[str] = None             # a DeepSpeed JSON to check against this config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
