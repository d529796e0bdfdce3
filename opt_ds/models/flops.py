"""Training FLOPs of an OPT step, in the conventions papers use (each figure carries its formula).

B sequences of length s, l layers, hidden h, vocabulary V (Narayanan et al. 2021):
  model FLOPs (no recompute)      72 B s l h^2 (1 + s/(6h) + V/(12 l h))
  hardware FLOPs (full recompute) 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
  6N + attention (torchtitan)     B s (6 N_matmul + 12 l h s)
"""
from __future__ import annotations

from opt_ds.models.presets import OPTShape

MODEL_FLOPS_FORMULA = "72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)) [Narayanan eq., no recompute]"
HARDWARE_FLOPS_FORMULA = "96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) [Narayanan eq. 3, full recompute]"
SIX_N_FORMULA = "B*s*(6*N_matmul + 12*l*h*s) [6N + attention, torchtitan]"


def model_flops(shape: OPTShape, batch: int, seq: int) -> float:
    """FLOPs of one forward+backward without activation recompute."""
    l, h, v = shape.num_layers, shape.hidden_size, shape.vocab_size
    return 72.0 * batch * seq * l * h * h * (1 + seq / (6 * h) + v / (12 * l * h))


def hardware_flops(shape: OPTShape, batch: int, seq: int, recompute: bool) -> float:
    """FLOPs the hardware executes: with full activation recompute the forward runs twice."""
    if not recompute:
        return model_flops(shape, batch, seq)
    l, h, v = shape.num_layers, shape.hidden_size, shape.vocab_size
    return 96.0 * batch * seq * l * h * h * (1 + seq / (6 * h) + v / (16 * l * h))


def matmul_parameters(shape: OPTShape) -> int:
    """Parameters that take part in matrix multiplies (no biases, norms or position table)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    projections = 2 * shape.embed_dim * h if shape.has_projections else 0
    return shape.num_layers * (4 * h * h + 2 * h * f) + shape.vocab_size * shape.embed_dim + projections


def six_n_flops(shape: OPTShape, batch: int, seq: int) -> float:
    """torchtitan's convention: 6 FLOPs per matmul parameter per token plus full s^2 attention."""
    per_token = 6 * matmul_parameters(shape) + 12 * shape.num_layers * shape.hidden_size * seq
    return float(batch * seq * per_token)
