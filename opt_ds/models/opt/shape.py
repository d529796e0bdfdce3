"""OPT shapes: the architecture of each size (the recipe each was trained with: ds_configs/opt-*.yaml).

Source: OPT paper (arXiv 2205.01068) table 1 and metaseq's `opt_job_constants.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from opt_ds.models.protocol import Preset

OPT_VOCAB_SIZE = 50272          # 50,265 tokenizer entries padded to a multiple of 8
OPT_MAX_POSITIONS = 2048
POSITION_OFFSET = 2             # learned positions start at row 2 (metaseq padding_idx=1, plus one)
PAD_ID, BOS_ID, EOS_ID = 1, 2, 2


@dataclass(frozen=True)
class OPTShape:
    """Architecture of one OPT decoder. Field names follow Hugging Face's OPTConfig where one exists."""
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int = OPT_VOCAB_SIZE
    max_position_embeddings: int = OPT_MAX_POSITIONS
    word_embed_proj_dim: Optional[int] = None   # opt-350m: 512, embedded then projected to hidden
    pre_layer_norm: bool = True                 # HF do_layer_norm_before; False only for opt-350m
    dropout: float = 0.1                        # residual branches; never on embeddings
    attention_dropout: float = 0.0
    init_std: float = 0.006
    layer_norm_eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.pre_layer_norm

    def replace(self, **changes) -> "OPTShape":
        return dataclasses.replace(self, **changes)


PRESETS = {p.name: p for p in [
    Preset("opt-125m", OPTShape(12, 768, 12, 3072)),
    Preset("opt-350m", OPTShape(24, 1024, 16, 4096, word_embed_proj_dim=512, pre_layer_norm=False)),
    Preset("opt-1.3b", OPTShape(24, 2048, 32, 8192)),
    Preset("opt-2.7b", OPTShape(32, 2560, 32, 10240)),
    Preset("opt-6.7b", OPTShape(32, 4096, 32, 16384)),
    Preset("opt-13b", OPTShape(40, 5120, 40, 20480)),
    Preset("opt-30b", OPTShape(48, 7168, 56, 28672)),
    Preset("opt-66b", OPTShape(64, 9216, 72, 36864)),
    Preset("opt-175b", OPTShape(96, 12288, 96, 49152)),
]}


def analytic_parameter_count(shape: OPTShape) -> int:
    """Parameters of an OPT decoder with a tied LM head, counted from the formula (no tensors)."""
    h, f, e = shape.hidden_size, shape.ffn_hidden_size, shape.embed_dim
    attention = 4 * h * h + 4 * h
    mlp = 2 * h * f + f + h
    layer_norms = 2 * 2 * h
    per_layer = attention + mlp + layer_norms
    embeddings = shape.vocab_size * e + (shape.max_position_embeddings + POSITION_OFFSET) * h
    projections = 2 * e * h if shape.has_projections else 0
    final_norm = 2 * h if shape.has_final_layer_norm else 0
    return embeddings + projections + shape.num_layers * per_layer + final_norm
