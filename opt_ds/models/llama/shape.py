"""LLaMA shapes: the architecture of each size (the recipe each was trained with: ds_configs/llama*.yaml).

Sources: LLaMA (arXiv 2302.13971) table 2 and Llama 2 (arXiv 2307.09288) table 1: pre-norm RMSNorm,
SwiGLU MLP, rotary positions, no biases, untied output head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from opt_ds.models.protocol import Preset

LLAMA_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class LlamaShape:
    """Architecture of one LLaMA decoder. Field names follow opt_ds's OPTShape where the meaning is shared
    (Hugging Face's LlamaConfig: intermediate_size = ffn_hidden_size, num_key_value_heads = num_kv_heads)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int = LLAMA_VOCAB_SIZE
    max_position_embeddings: int = 2048
    num_kv_heads: Optional[int] = None          # grouped-query attention; None = num_heads (multi-head)
    rope_theta: float = 10000.0                 # Llama 3: 500000
    rms_norm_eps: float = 1e-6                  # Llama 2: 1e-5
    init_std: float = 0.02
    dropout: float = 0.0                        # LLaMA trains without dropout; kept for experiments
    attention_dropout: float = 0.0

    def __post_init__(self):
        kv = self.kv_heads
        if kv < 1 or self.num_heads % kv:
            divisors = ", ".join(str(d) for d in range(1, self.num_heads + 1) if self.num_heads % d == 0)
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {kv}: each key/value "
                             f"head serves a whole group of query heads; choose num_kv_heads from {divisors}")
        if self.hidden_size % self.num_heads == 0 and self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (hidden_size {self.hidden_size} / num_heads "
                             f"{self.num_heads}) is odd; rotary embeddings rotate pairs of dims, so choose "
                             f"hidden_size and num_heads with an even quotient")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "LlamaShape":
        return dataclasses.replace(self, **changes)


PRESETS = {p.name: p for p in [
    Preset("llama-7b", LlamaShape(32, 4096, 32, 11008)),
    Preset("llama-13b", LlamaShape(40, 5120, 40, 13824)),
    Preset("llama-33b", LlamaShape(60, 6656, 52, 17920)),
    Preset("llama-65b", LlamaShape(80, 8192, 64, 22016)),
    Preset("llama2-70b", LlamaShape(80, 8192, 64, 28672, num_kv_heads=8, max_position_embeddings=4096,
                                    rms_norm_eps=1e-5)),
]}


def layer_matmul_parameters(shape: LlamaShape) -> int:
    """q and o (h² each), k and v (h·kv·d each), gate, up and down (h·F each)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    kv_width = shape.kv_heads * shape.head_dim
    return 2 * h * h + 2 * h * kv_width + 3 * h * f


def analytic_parameter_count(shape: LlamaShape) -> int:
    """Parameters of a LLaMA decoder with an untied head, counted from the formula (no tensors)."""
    h, v = shape.hidden_size, shape.vocab_size
    per_layer = layer_matmul_parameters(shape) + 2 * h          # + two RMSNorm weights
    return 2 * v * h + shape.num_layers * per_layer + h        # embedding, head, final norm
