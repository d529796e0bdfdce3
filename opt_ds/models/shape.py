"""A decoder-only transformer's shape in general terms (any family: OPT, BLOOM, GPT-3, LLaMA), for the
FLOPs conventions, the throughput projection and the layout planner.

`DecoderShape.parse("layers=80,hidden=8192,heads=64,ffn=22016,gated=1,vocab=32000,tied=0")` or
`as_decoder_shape(a family's shape)`; `SHAPE_KEYS` lists the keys. The training code builds models from its family's own
shape (e.g. OPTShape); this one only describes the work and the tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from opt_ds.errors import UserError


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_kv_heads: Optional[int] = None     # grouped-query attention; None = num_heads
    gated_mlp: bool = False                # SwiGLU/GeGLU: three F×h matrices instead of two
    relu: bool = False                     # ReLU MLP (OPT): its output is the only tensor it saves
    tied_head: bool = True                 # LM head shares the token embedding
    bias: bool = True                      # linear layers carry biases (OPT, BLOOM, GPT-3; not LLaMA)
    rms_norm: bool = False                 # RMSNorm (weight only) instead of LayerNorm (weight and bias)
    position_rows: int = 0                 # learned position table rows (OPT 2050); 0 = rotary / ALiBi
    embed_dim: Optional[int] = None        # OPT-350m embeds at 512 and projects to hidden; None = hidden
    embedding_norm: bool = False           # BLOOM's LayerNorm right after the embedding
    final_norm: bool = True

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.embedding_width != self.hidden_size

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def layer_matmul_weights(self) -> int:
        """Weights of one decoder layer's matmuls: Q, K, V, output projection and the MLP."""
        h = self.hidden_size
        qkv = h * (h + 2 * self.kv_heads * self.head_dim)
        return qkv + h * h + self.mlp_matrices * h * self.ffn_hidden_size

    def layer_parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        biases = (h + 2 * self.kv_heads * self.head_dim) + h + (self.mlp_matrices - 1) * f + h if self.bias else 0
        return self.layer_matmul_weights() + biases + 2 * self.single_norm_parameters()

    def layer_replicated_parameters(self) -> int:
        """Parameters every TP rank holds whole: the norms and the biases of the row-parallel linears."""
        return 2 * self.single_norm_parameters() + (2 * self.hidden_size if self.bias else 0)

    def single_norm_parameters(self) -> int:
        return self.hidden_size if self.rms_norm else 2 * self.hidden_size

    def norm_parameters(self) -> int:
        """The final and embedding norms (outside the decoder layers)."""
        return self.single_norm_parameters() * (int(self.final_norm) + int(self.embedding_norm))

    def embedding_parameters(self) -> int:
        """Token table (and the untied head), positions, OPT-350m's projections, embedding/final norms."""
        e, h = self.embedding_width, self.hidden_size
        tables = self.vocab_size * e * (1 if self.tied_head else 2) + self.position_rows * h
        projections = 2 * e * h if self.has_projections else 0
        return tables + projections + self.norm_parameters()

    def parameter_count(self) -> int:
        return self.num_layers * self.layer_parameters() + self.embedding_parameters()

    def matmul_parameters(self) -> int:
        """N of the 6N convention: every parameter but the lookup tables, with the LM head counted once."""
        return self.parameter_count() - self.position_rows * self.hidden_size - (
            0 if self.tied_head else self.vocab_size * self.embedding_width)

    def replace(self, **changes) -> "DecoderShape":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [f"l={self.num_layers}", f"h={self.hidden_size}", f"a={self.num_heads}"]
        if self.kv_heads != self.num_heads:
            parts.append(f"kv={self.kv_heads}")
        parts += [f"F={self.ffn_hidden_size}{' gated' if self.gated_mlp else ''}", f"V={self.vocab_size}"]
        if not self.tied_head:
            parts.append("untied head")
        return ", ".join(parts)

    def spec(self) -> str:
        """The `key=value,...` text that parses back to this shape."""
        default = DecoderShape(1, 1, 1, 1, 1)
        items = []
        for key, name in SHAPE_KEYS.items():
            value = getattr(self, name)
            if name in _REQUIRED or value != getattr(default, name):
                items.append(f"{key}={int(value) if isinstance(value, bool) else value}")
        return ",".join(items)

    @classmethod
    def parse(cls, text: str, base: Optional["DecoderShape"] = None) -> "DecoderShape":
        """`key=value,...` (keys in SHAPE_KEYS), applied over `base` when given."""
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in SHAPE_KEYS:
                raise UserError(f"shape item {item!r}: expected key=value with a key among {', '.join(SHAPE_KEYS)} "
                                "(e.g. layers=80,hidden=8192,heads=64,ffn=22016,gated=1,vocab=32000)")
            name = SHAPE_KEYS[key]
            values[name] = _parse_value(key, name, raw.strip())
        if base is not None:
            return base.replace(**values)
        missing = [k for k, n in SHAPE_KEYS.items() if n in _REQUIRED and n not in values]
        if missing:
            raise UserError(f"shape {text!r}: also give {', '.join(missing)} (or start from a preset: "
                            "--model opt-175b --shape layers=48)")
        shape = cls(**values)
        if shape.hidden_size % shape.num_heads or shape.num_heads % shape.kv_heads:
            raise UserError(f"shape {text!r}: hidden must be a multiple of heads and heads of kv_heads")
        return shape


SHAPE_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "ffn": "ffn_hidden_size",
              "vocab": "vocab_size", "kv_heads": "num_kv_heads", "gated": "gated_mlp", "relu": "relu",
              "tied": "tied_head", "bias": "bias", "rmsnorm": "rms_norm", "positions": "position_rows",
              "embed": "embed_dim", "embed_norm": "embedding_norm", "final_norm": "final_norm"}
_REQUIRED = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size")
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_value(key: str, name: str, raw: str):
    if isinstance(getattr(DecoderShape(1, 1, 1, 1, 1), name), bool):
        if raw.lower() not in _BOOLEANS:
            raise UserError(f"shape key {key}={raw!r}: use {key}=1 or {key}=0")
        return _BOOLEANS[raw.lower()]
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"shape key {key}={raw!r}: expected a positive integer") from None
    if value < (0 if name == "position_rows" else 1):
        raise UserError(f"shape key {key}={raw!r}: expected a positive integer")
    return value
