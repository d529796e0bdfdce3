"""FLOPs per training step under the three conventions papers use, each with its formula written out.

For B sequences of s tokens, l decoder layers, hidden h, vocabulary V (training-recipe.md, anchors §6.4):

  model      72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))   Narayanan et al. 2021 without recompute, full s² attention
  hardware   96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))   Narayanan eq. 3: every layer's forward runs twice
  6N+attn    B·s·(6·N + 12·l·h·s)                     torchtitan; N = the parameters used in matmuls

The closed forms assume 12·h² matmul weights per layer (attention 4h², a 4h-wide two-matrix MLP 8h²) and
an LM head of width h, which holds for every OPT size but opt-350m (512-wide embedding with project_in/
project_out) and for no LLaMA (SwiGLU's three F-wide matrices, grouped-query K/V). The sums below are exact
per term, from the model family's matmul weights, and reduce to the closed forms for 12h²-layer shapes;
for other shapes the formula text says which terms changed.
"""
from __future__ import annotations

from dataclasses import dataclass

from opt_ds.models.family import family_of

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
    """Forward + backward FLOPs of one decoder layer per token: 3 × (2·matmul weights + attention 4·s·h).

    OPT's matmul weights are 4h² + 2hF; LLaMA's h·(h + 2·kv·d) + h² + 3hF. The attention term counts the
    full s×s score and context products (no causal halving), as Narayanan et al. do; biases, norms,
    softmax and activations are not counted.
    """
    weights = family_of(shape).layer_matmul_parameters(shape)
    return 3.0 * (2.0 * weights + 4.0 * seq * shape.hidden_size)


def head_flops_per_token(shape) -> float:
    """Forward + backward FLOPs of the LM head (6·V·E) and of opt-350m's project_in/out (2 × 6·E·h)."""
    return 6.0 * family_of(shape).head_matmul_parameters(shape)


def matmul_parameters(shape) -> int:
    """N for the 6N convention: every parameter except the lookup tables.

    torchtitan subtracts embedding tables from N; its models have an untied output head, which stays in
    N (so for LLaMA the token embedding is left out and the head counted). OPT's head is the tied token
    embedding, and its V×E matmul is real work, so it is counted; only OPT's learned positions are left out.
    """
    family = family_of(shape)
    return family.analytic_parameter_count(shape) - family.lookup_parameters(shape)


def _shape_note(shape) -> str:
    notes = family_of(shape).flops_notes(shape)
    return " [exact per-term sum; " + "; ".join(notes) + "]" if notes else ""


def model_flops(shape, batch: int, seq: int) -> FlopsCount:
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
