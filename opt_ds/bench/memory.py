"""Memory per GPU of a training layout: weights, gradients, optimizer state, activations and buffers.

Bytes per parameter held by one GPU (P = its stage's TP shard, d = DP ranks), as DeepSpeed allocates them:

  precision, ZeRO   weights  gradients                      optimizer state
  bf16, 0/1         2        4 fp32 accumulation + 2 bf16   12/d  fp32 master, Adam m, v (BF16_Optimizer)
                             (immediate accumulation: 4; the bf16 gradient is freed as it is added)
  fp16, 1           2        2 + 4/d fp32 partition         12/d  (DeepSpeedZeroOptimizer)
  fp16, 0           2        2 + 4 fp32 master gradients    12    (FP16_Optimizer)
  fp32, 1           4        4                              12/d  fp32 partition copy, m, v
  fp32, 0           4        4                              8     m, v (torch AdamW)
  any, 3 (FSDP)     ÷ d      ÷ d                            ÷ d

Buffers: DeepSpeedZeroOptimizer's gradient bucket under a pipeline (`reduce_bucket_size` = 5·10⁸
elements of the gradient dtype: 2 GB in fp32), the last stage's logits kept by the pipeline engine
(T·V/t, fp32), and the pipeline's send/receive buffers.

Activations of one micro-batch in one decoder layer (T = b·s tokens, hidden-sized tensors ÷ t only with
sequence parallelism), as autograd saves them: both LayerNorms' inputs and outputs (4·T·h), Q, K, V
(T·(h + 2·kv·d_head)/t), the attention output and its re-laid-out copy (2·T·h/t), the MLP (ReLU keeps
its output: T·F/t; GELU input and output: 2·T·F/t; gated: 4·T·F/t), dropout masks (1 byte per hidden
element each), and for unfused attention the scores (softmax output, dropout mask and output: 5 bytes per
score, 2 without dropout); flash kernels keep only a log-sum-exp. Under full recompute a layer keeps only
its input, plus one layer's full set while it is recomputed (after the loss's backward has freed the
logits). Selective recompute keeps everything but the attention core's own saved tensors: its output
(T·h/t) and, for unfused attention, the scores. A 1F1B stage i of p holds min(p − i, m) micro-batches; the last stage also keeps fp32 logits for
the loss (T·V/t · 4).
"""
from __future__ import annotations

from dataclasses import dataclass

from opt_ds.bench.inputs import PRECISION_BYTES, ProjectionInputs
from opt_ds.models.shape import DecoderShape
GIB = 2 ** 30
REDUCE_BUCKET_ELEMENTS = 500_000_000        # DeepSpeed zero_optimization.reduce_bucket_size default
KINDS = ("weights", "gradients", "optimizer", "activations", "buffers")


@dataclass
class MemoryEstimate:
    stage: int
    parts: dict                                 # kind -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        return ", ".join(f"{kind} {self.parts[kind] / GIB:.1f}" for kind in KINDS)


def stage_layers(shape: DecoderShape, pipeline: int, partition: str) -> list:
    """Decoder layers per stage: even over the layers (DeepSpeed `type:` partitioning, Megatron-LM), or with
    the embedding and head counted as one layer each (BLOOM's `type:transformer|embedding`)."""
    extra = 1 if partition == "layers+embedding" and pipeline > 1 else 0
    units = shape.num_layers + 2 * extra
    base, rest = divmod(units, pipeline)
    shares = [base + (1 if i >= pipeline - rest else 0) for i in range(pipeline)]
    shares[0] -= extra
    shares[-1] -= extra
    return shares


def stage_parameters(inp: ProjectionInputs, layers: list) -> list:
    """Parameters held by one GPU of each stage: TP shards of the matrices, vocabulary-parallel embedding
    (and its tied copy on the last stage), whole norms, row-parallel biases and position table."""
    shape, p, t = inp.shape, len(layers), inp.tensor
    replicated = shape.layer_replicated_parameters()
    per_layer = (shape.layer_parameters() - replicated) / t + replicated
    table = shape.vocab_size * shape.embedding_width / t
    projections = 2 * shape.embedding_width * shape.hidden_size if shape.has_projections else 0
    params = []
    for i, n in enumerate(layers):
        mine = n * per_layer
        if i == 0:
            mine += table + shape.position_rows * shape.hidden_size + projections / 2 + (
                shape.norm_parameters() - shape.single_norm_parameters() * shape.final_norm)
        if i == p - 1:
            mine += (table if shape.tied_head and p > 1 or not shape.tied_head else 0) + projections / 2 + (
                shape.single_norm_parameters() * shape.final_norm)
        params.append(mine)
    return params


def _state_bytes_per_parameter(precision: str, zero: int, d: int, grad_accumulation: str = "separate") -> tuple:
    shard = d if zero >= 1 else 1
    weights = PRECISION_BYTES[precision]
    if precision == "bf16":
        grads = 4.0 if grad_accumulation == "immediate" else 6.0
    elif precision == "fp16":
        grads = 2 + (4 / d if zero >= 1 else 4)
    else:
        grads = 4.0
    optimizer = 8.0 if (precision == "fp32" and zero == 0) else 12 / shard
    if zero == 3:
        weights, grads = weights / d, grads / d
    return weights, grads, optimizer


def layer_activation_bytes(inp: ProjectionInputs) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch on one TP rank (no recompute)."""
    shape, t, b, s = inp.shape, inp.tensor, inp.micro_batch, inp.seq
    tokens, h = b * s, shape.hidden_size
    hidden = tokens * h / (t if inp.sequence_parallel else 1)
    qkv = tokens * (h + 2 * shape.kv_heads * shape.head_dim) / t
    mlp = tokens * shape.ffn_hidden_size / t * (4 if shape.gated_mlp else 1 if shape.relu else 2)
    elements = 4 * hidden + qkv + 2 * tokens * h / t + mlp
    heads = b * shape.num_heads / t
    if inp.attention == "unfused":
        attention = heads * s * s * (5 if inp.dropout else 2)
    else:
        attention = heads * s * 4
    masks = 2 * hidden if inp.dropout else 0
    return elements * inp.activation_bytes + attention + masks


def _stage_activation_bytes(inp: ProjectionInputs, stage: int, layers: int, micro_batches: int) -> float:
    p = inp.pipeline
    in_flight = min(p - stage, micro_batches)
    tokens = inp.micro_batch * inp.seq
    full = layer_activation_bytes(inp)
    if inp.recompute == "full":
        checkpoints = tokens * inp.shape.hidden_size * inp.activation_bytes
        layer_total = layers * checkpoints * in_flight
    elif inp.recompute == "selective":
        scores = inp.micro_batch * inp.shape.num_heads / inp.tensor * inp.seq ** 2 * (5 if inp.dropout else 2)
        core_output = tokens * inp.shape.hidden_size / inp.tensor * inp.activation_bytes
        kept = full - core_output - (scores if inp.attention == "unfused" else 0)
        layer_total = layers * kept * in_flight
    else:
        layer_total = layers * full * in_flight
    logits = tokens * inp.shape.vocab_size / inp.tensor * 4 if stage == p - 1 else 0
    if inp.recompute == "full":
        # the loss's backward frees the logits before the last layer is recomputed
        return layer_total + max(full if layers else 0, logits)
    return layer_total + logits


def stage_memory(inp: ProjectionInputs) -> list:
    """Per-GPU memory of each pipeline stage."""
    d = inp.gpus // (inp.tensor * inp.pipeline)
    m = max(1, inp.global_batch // (d * inp.micro_batch))
    layers = stage_layers(inp.shape, inp.pipeline, inp.partition)
    weights, grads, optimizer = _state_bytes_per_parameter(inp.precision, inp.zero_stage, d, inp.grad_accumulation)
    estimates = []
    for i, (n, params) in enumerate(zip(layers, stage_parameters(inp, layers))):
        bucket = (REDUCE_BUCKET_ELEMENTS * PRECISION_BYTES[inp.precision]
                  if inp.zero_stage == 1 and inp.precision != "bf16" else 0)
        pipe = (2 * inp.micro_batch * inp.seq * inp.shape.hidden_size * inp.activation_bytes
                * min(inp.pipeline - i, m) if inp.pipeline > 1 else 0)
        logits_kept = inp.micro_batch * inp.seq * inp.shape.vocab_size / inp.tensor * 4 if i == len(layers) - 1 else 0
        estimates.append(MemoryEstimate(i, {
            "weights": params * weights, "gradients": params * grads, "optimizer": params * optimizer,
            "activations": _stage_activation_bytes(inp, i, n, m), "buffers": bucket + pipe + logits_kept}))
    return estimates


def estimate_memory(inp: ProjectionInputs) -> MemoryEstimate:
    """Per-GPU memory of the stage that needs the most."""
    return max(stage_memory(inp), key=lambda e: e.total)
