"""Named benchmark cases and the `name:key=value,...` syntax that adjusts one.

A case is a model shape plus everything that decides the work of one optimizer step: the TP × PP × DP
layout, micro-batch, gradient-accumulation micro-batches, sequence length, precision and the activation
checkpoint interval. Its `config()` is the real opt_ds run configuration (validated by
opt_ds.config, so a bad case fails with that module's message before anything runs).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from opt_ds.config import ConfigError, ResolvedConfig, load_config
from opt_ds.config.sections import ModelConfig
from opt_ds.models.family import family_named, family_of, get_preset
from opt_ds.models.llama.shape import LlamaShape
from opt_ds.models.opt.shape import OPTShape

# OPT trained with dropout 0.1; the named cases use 0.0 like the peer benchmark behind the reference
# H100 numbers, so both sides of every comparison do the same work. `:dropout=0.1`
# measures the recipe's setting.
BENCH_DROPOUT = 0.0
TINY_SHAPE = OPTShape(num_layers=4, hidden_size=64, num_heads=4, ffn_hidden_size=256, vocab_size=1024,
                      max_position_embeddings=128, dropout=BENCH_DROPOUT)
TINY_LLAMA_SHAPE = LlamaShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                              vocab_size=1024, max_position_embeddings=128)


@dataclass(frozen=True)
class BenchCase:
    name: str
    shape: object                   # a model family's shape (OPTShape, LlamaShape)
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    micro_batch: int = 1
    grad_accum: int = 1             # micro-batches per optimizer step on each replica
    seq: int = 2048
    precision: str = "auto"         # auto = bf16 on GPU, fp32 on CPU
    ac_interval: int = 0            # decoder layers per activation-checkpointed block; 0 = off
    recompute: str = ""             # none | selective | full (parallel.recompute); "" = by ac_interval
    sequence_parallel: bool = False # parallel.sequence_parallel (takes effect with TP > 1)
    grad_accumulation: str = "immediate"    # bf16: immediate | separate (precision.grad_accumulation)
    fused: bool = True              # megatron-core's fused element-wise kernels on GPU (off: plain expressions)
    compile: bool = False           # torch.compile each pipeline layer (DeepSpeed PipelineModule.compile)
    peer: bool = True               # run the peers on this case's shape (when --peer)
    note: str = ""

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data

    @property
    def layout(self) -> str:
        return f"TP{self.tensor}·PP{self.pipeline}·DP{self.data}"

    def label(self) -> str:
        """Name plus what differs from the named case, e.g. `opt-2.7b:mb=2,ac=1`."""
        base = NAMED_CASES.get(self.name)
        if base is None:
            return self.name
        # Precision has its own column in every report; `peer` does not change the measurement.
        changed = [f"{key}={_text(getattr(self, field))}" for key, field in SPEC_KEYS.items()
                   if field not in ("precision", "peer") and getattr(self, field) != getattr(base, field)]
        if self.shape.num_layers != base.shape.num_layers:
            changed.insert(0, f"layers={self.shape.num_layers}")
        if self.shape.dropout != base.shape.dropout:
            changed.append(f"dropout={self.shape.dropout:g}")
        return self.name + (":" + ",".join(changed) if changed else "")

    def peer_key(self) -> tuple:
        """Cases with the same key share one peer measurement (peers always run on one device)."""
        return (self.shape, self.micro_batch, self.seq, self.precision, self.ac_interval > 0 or self.recompute == "full")

    def resolve_precision(self, cuda: bool) -> "BenchCase":
        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision="bf16" if cuda else "fp32")

    def config_overrides(self, steps: int = 10, seed: int = 1234) -> list:
        settable = {f.name for f in dataclasses.fields(ModelConfig)}
        overrides = [f"model.family={family_of(self.shape).name}"] + [
            f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in dataclasses.asdict(self.shape).items()
            if key in settable and key != "init_std" and value is not None] + [
            f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}", f"parallel.data={self.data}",
            f"parallel.activation_checkpoint_interval={self.ac_interval}",
            *([f"parallel.recompute={self.recompute}"] if self.recompute else []),
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"precision.grad_accumulation={self.grad_accumulation}",
            f"batch.micro_batch_size={self.micro_batch}", f"batch.global_batch_size={self.global_batch}",
            f"batch.seq_length={self.seq}",
            f"precision.dtype={self.precision}",
            "optimizer.schedule=constant", "optimizer.lr=1.0e-4",
            f"train.steps={steps}", f"train.seed={seed}",
        ]
        return overrides

    def config(self, world_size: Optional[int] = None, steps: int = 10) -> ResolvedConfig:
        if self.precision == "auto":
            raise ValueError("resolve_precision() before config()")
        return load_config(None, self.config_overrides(steps), world_size=world_size or self.world_size)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["shape"] = dataclasses.asdict(self.shape)
        data["family"] = family_of(self.shape).name
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BenchCase":
        data = dict(data)
        data["shape"] = family_named(data.pop("family", "opt")).shape_type(**data["shape"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _preset_shape(name: str, **changes):
    return get_preset(name).shape.replace(dropout=BENCH_DROPOUT, **changes)


def _preset_case(name: str, **kwargs) -> BenchCase:
    return BenchCase(name, _preset_shape(name), **kwargs)


NAMED_CASES = {c.name: c for c in [
    BenchCase("tiny", TINY_SHAPE, micro_batch=2, seq=64, note="CPU smoke case"),
    BenchCase("tiny-tp2", TINY_SHAPE, tensor=2, micro_batch=2, seq=64, note="CPU, 2 ranks"),
    BenchCase("tiny-pp2", TINY_SHAPE, pipeline=2, micro_batch=2, grad_accum=4, seq=64, note="CPU, 2 ranks"),
    BenchCase("tiny-3d", TINY_SHAPE, tensor=2, pipeline=2, data=2, micro_batch=2, grad_accum=2, seq=64,
              note="CPU, 8 ranks"),
    _preset_case("opt-125m", micro_batch=8),
    _preset_case("opt-350m", micro_batch=8, note="512-wide embedding with project_in/out"),
    _preset_case("opt-1.3b", micro_batch=8),
    _preset_case("opt-2.7b", micro_batch=4),
    _preset_case("opt-6.7b", tensor=2, micro_batch=2, ac_interval=1, note="TP=2 as OPT trained it; 2 GPUs"),
    BenchCase("175b-slice", _preset_shape("opt-175b", num_layers=4), tensor=8, micro_batch=1, ac_interval=1,
              note="4 layers of OPT-175B at OPT's TP=8 (one 8-GPU node); on one GPU use 175b-slice:tp=1,layers=1"),
    BenchCase("tiny-llama", TINY_LLAMA_SHAPE, micro_batch=2, seq=64, note="CPU, LLaMA with GQA"),
    BenchCase("llama-65b-layer", _preset_shape("llama-65b", num_layers=1), micro_batch=1, ac_interval=1,
              note="one LLaMA-65B layer with its embedding and head, one GPU"),
]}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# `name:key=value` keys and the BenchCase field each sets (layers and dropout change the shape).
SPEC_KEYS = {"tp": "tensor", "pp": "pipeline", "dp": "data", "mb": "micro_batch", "gas": "grad_accum",
             "seq": "seq", "precision": "precision", "ac": "ac_interval", "compile": "compile", "peer": "peer",
             "recompute": "recompute", "sp": "sequence_parallel", "accum": "grad_accumulation", "fused": "fused"}
CHOICES = {"precision": PRECISIONS, "recompute": ("none", "selective", "full"),
           "accum": ("immediate", "separate")}
SHAPE_KEYS = {"layers": "num_layers", "dropout": "dropout"}


def _text(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _parse_value(key: str, text: str):
    if key in CHOICES:
        if text not in CHOICES[key]:
            raise ConfigError(f"case key {key}={text!r}: choose one of {', '.join(CHOICES[key])}")
        return text
    if key in ("peer", "compile", "sp", "fused"):
        if text.lower() not in ("0", "1", "true", "false", "on", "off"):
            raise ConfigError(f"case key {key}={text!r}: use {key}=on or {key}=off")
        return text.lower() in ("1", "true", "on")
    try:
        return float(text) if key == "dropout" else int(text)
    except ValueError:
        kind = "a number" if key == "dropout" else "an integer"
        raise ConfigError(f"case key {key}={text!r}: expected {kind}") from None


def with_changes(case: BenchCase, changes: dict) -> BenchCase:
    """Apply `{key: value}` changes using the spec keys (tp, pp, dp, mb, gas, seq, precision, ac, peer,
    layers, dropout)."""
    fields, shape_fields = {}, {}
    for key, value in changes.items():
        if key in SPEC_KEYS:
            fields[SPEC_KEYS[key]] = value
        elif key in SHAPE_KEYS:
            shape_fields[SHAPE_KEYS[key]] = value
        else:
            valid = ", ".join([*SPEC_KEYS, *SHAPE_KEYS])
            raise ConfigError(f"unknown case key {key!r}; valid keys: {valid}")
    if shape_fields:
        fields["shape"] = case.shape.replace(**shape_fields)
    return dataclasses.replace(case, **fields)


def parse_case(spec: str, defaults: Optional[dict] = None) -> BenchCase:
    """`opt-2.7b` or `opt-2.7b:mb=2,ac=1`. `defaults` (from command-line flags) apply first, the
    spec's own keys win over them."""
    name, _, rest = spec.strip().partition(":")
    if name not in NAMED_CASES:
        raise ConfigError(f"unknown benchmark case {name!r}; choose one of {', '.join(NAMED_CASES)} "
                          "(adjust one with name:key=value, e.g. opt-2.7b:mb=2)")
    changes = dict(defaults or {})
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"case {spec!r}: {item!r} is not key=value (e.g. {name}:mb=2)")
        changes[key.strip()] = _parse_value(key.strip(), text.strip())
    return with_changes(NAMED_CASES[name], changes)
