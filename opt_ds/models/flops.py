"""FLOPs per training step under the three conventions papers use, each with its formula written out.

For B sequences of s tokens, l decoder layers, hidden h, vocabulary V (Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", appendix; Kaplan et al. 2020 for 6N):

  model      72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))   Narayanan et al. 2021 without recompute, full s² attention
  hardware   96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))   Narayanan eq. 3: every layer's forward runs twice
  6N+attn    B·s·(6·N + 12·l·h·s)                     torchtitan; N = the parameters used in matmuls

The closed forms assume an MLP of two h×4h matrices, full multi-head attention and an LM head of width h,
which holds for every OPT size but opt-350m (512-wide embedding with project_in/project_out). The sums below
are exact per term (any DecoderShape: gated MLPs, grouped-query attention) and reduce to the closed forms
in that case; for other shapes the formula text says which terms changed.
"""
from __future__ import annotations

from dataclasses import dataclass

from opt_ds.models.family import as_decoder_shape
from opt_ds.models.shape import DecoderShape

MODEL_FORMULA = "72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))"
HARDWARE_FORMULA = "96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))"
SIXN_FORMULA = "B·s·(6·N + 12·l·h·s)"

# The OPT paper's per-GPU figure for OPT-175B on 992 A100-80GB, the number the suite is compared with.
OPT_175B_A100_TFLOPS = 147.0


@dataclass(frozen=True)
class FlopsCount:
    """FLOPs of one optimizer step under one convention, with the arithmetic that produced it."""
    key: str            # model | hardware | 6n_attention
    label: str
    flops: float
    formula: str        # the general formula
    worked: str         # the formula with this run's numbers substituted


def layer_flops_per_token(shape, seq: int) -> float:
    """Forward + backward FLOPs of one decoder layer per token: 3 × (2·matmul weights + attention 4·s·h);
    the matmul weights are 4h² + 2hF for OPT.

    The attention term counts the full s×s score and context products (no causal halving), as
    Narayanan et al. do; biases, LayerNorm, softmax and ReLU are not counted.
    """
    shape = as_decoder_shape(shape)
    return 3.0 * (2.0 * shape.layer_matmul_weights() + 4.0 * seq * shape.hidden_size)


def head_flops_per_token(shape) -> float:
    """Forward + backward FLOPs of the LM head (6·V·E) and of opt-350m's project_in/out (2 × 6·E·h)."""
    shape = as_decoder_shape(shape)
    e, h = shape.embedding_width, shape.hidden_size
    projections = 12.0 * e * h if shape.has_projections else 0.0
    return 6.0 * shape.vocab_size * e + projections


def matmul_parameters(shape) -> int:
    """N for the 6N convention: every parameter except the lookup tables, plus the tied LM head once.

    torchtitan subtracts embedding tables from N; its models have an untied output head, which stays in
    N. OPT's head is the tied token embedding, and its V×E matmul is real work, so it is counted here.
    """
    return as_decoder_shape(shape).matmul_parameters()


def _closed_form_applies(shape: DecoderShape) -> bool:
    return (shape.ffn_hidden_size == 4 * shape.hidden_size and not shape.gated_mlp
            and shape.kv_heads == shape.num_heads and not shape.has_projections)


def _shape_note(shape: DecoderShape) -> str:
    if _closed_form_applies(shape):
        return ""
    notes = []
    if shape.ffn_hidden_size != 4 * shape.hidden_size or shape.gated_mlp or shape.kv_heads != shape.num_heads:
        notes.append(f"matmul weights {shape.layer_matmul_weights():.4g} per layer ≠ 12h² "
                     f"(F={shape.ffn_hidden_size}{', gated' if shape.gated_mlp else ''}"
                     f"{f', {shape.kv_heads} kv heads' if shape.kv_heads != shape.num_heads else ''}): "
                     "per-layer term 6·weights + 12·s·h")
    if shape.has_projections:
        notes.append(f"E={shape.embedding_width}≠h: logits 6·V·E plus project_in/out 12·E·h per token")
    return " [exact per-term sum; " + "; ".join(notes) + "]"


def model_flops(shape, batch: int, seq: int) -> FlopsCount:
    shape = as_decoder_shape(shape)
    l, h, v = shape.num_layers, shape.hidden_size, shape.vocab_size
    tokens = batch * seq
    flops = tokens * (l * layer_flops_per_token(shape, seq) + head_flops_per_token(shape))
    worked = (f"72·{batch}·{seq}·{l}·{h}²·(1 + {seq / (6 * h):.4f} + {v / (12 * l * h):.4f})"
              f"{_shape_note(shape)} = {flops:.4g}")
    return FlopsCount("model", "model FLOPs, no recompute", flops, MODEL_FORMULA, worked)


def hardware_flops(shape, batch: int, seq: int, recomputed_layers: int) -> FlopsCount:
    """Model FLOPs plus one more forward pass of each decoder layer whose activations are recomputed.

    With every layer recomputed this is Narayanan's eq. 3; with none it equals the model FLOPs.
    """
    shape = as_decoder_shape(shape)
    l, h, v = shape.num_layers, shape.hidden_size, shape.vocab_size
    tokens = batch * seq
    recompute = tokens * recomputed_layers * layer_flops_per_token(shape, seq) / 3.0
    model = model_flops(shape, batch, seq).flops
    flops = model + recompute
    if recomputed_layers == l:
        worked = (f"96·{batch}·{seq}·{l}·{h}²·(1 + {seq / (6 * h):.4f} + {v / (16 * l * h):.4f})"
                  f"{_shape_note(shape)} = {flops:.4g}")
    elif recomputed_layers == 0:
        worked = f"no activation recompute: equal to model FLOPs = {flops:.4g}"
    else:
        worked = (f"model FLOPs {model:.4g} + one more forward of the {recomputed_layers} of {l} layers "
                  f"that are recomputed {recompute:.4g} = {flops:.4g}")
    return FlopsCount("hardware", "hardware FLOPs, with recompute", flops, HARDWARE_FORMULA, worked)


def sixn_attention_flops(shape, batch: int, seq: int) -> FlopsCount:
    shape = as_decoder_shape(shape)
    l, h = shape.num_layers, shape.hidden_size
    n = matmul_parameters(shape)
    flops = batch * seq * (6.0 * n + 12.0 * l * h * seq)
    worked = f"{batch}·{seq}·(6·{n:.4g} + 12·{l}·{h}·{seq}) = {flops:.4g}"
    return FlopsCount("6n_attention", "6N + attention (torchtitan)", flops, SIXN_FORMULA, worked)


def all_conventions(shape, batch: int, seq: int, recomputed_layers: int) -> list:
    """The three conventions for one optimizer step of `batch` sequences, in the order reports use."""
    return [model_flops(shape, batch, seq),
            hardware_flops(shape, batch, seq, recomputed_layers),
            sixn_attention_flops(shape, batch, seq)]
