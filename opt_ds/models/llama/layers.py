"""The LLaMA decoder, written with megatron-core tensor-parallel layers.

Pieces a pipeline stage can own:

    LlamaTokenEmbedding   vocab-parallel token embedding
    LlamaDecoderLayer     x + attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)), TP-split
    LlamaFinalNorm        final RMSNorm
    LlamaOutputHead       untied column-parallel head: logits for this TP rank's slice of the vocabulary

Tensor-parallel layout (a TP shard is a contiguous block of rows of the full matrix):
  * fused QKV rows are grouped per key/value head: [q_(g·n)...q_(g·n+n-1), k_g, v_g] for each kv head g,
    n = num_heads / num_kv_heads (megatron's GQA layout), so a shard holds whole groups;
  * gate and up are one ColumnParallelLinear with partition_stride 2: the full matrix is [gate; up] and
    each shard is [gate_shard; up_shard] (megatron initialises and the gather/convert code merges by the
    stride attribute);
  * o_proj and down_proj are row-parallel.
Rotary embeddings use Hugging Face's rotate-half convention (q·cos + rotate_half(q)·sin, frequencies
theta^(-2i/d) repeated over the two halves). Attention is opt_ds.models.attention (SDPA, causal, optional
selective recompute); dropout + residual and SwiGLU go through opt_ds.models.fused. Decoder layers work on
[seq, batch, hidden] (opt_ds.models.sequence); the embedding turns its output into that layout and the head
turns the logits back to [batch, seq, vocab/TP].
The init is LLaMA's (Hugging Face's LlamaPreTrainedModel): every matrix N(0, init_std), RMSNorm weights 1.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron.core import tensor_parallel

from opt_ds.models.attention import attention_core
from opt_ds.models.fused import bias_dropout_add, swiglu
from opt_ds.models.llama.shape import LlamaShape
from opt_ds.models.sequence import mark_sequence_parallel, to_decoder_layout


def _normal(std: float):
    def init(tensor):
        return nn.init.normal_(tensor, mean=0.0, std=std)
    return init


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back before the weight (as Hugging Face does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype):
    """cos and sin of every position × frequency, [seq, head_dim], both halves repeated (rotate-half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LlamaTokenEmbedding(nn.Module):
    def __init__(self, shape: LlamaShape, mp_config, tp_group=None):
        super().__init__()
        self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
            shape.vocab_size, shape.hidden_size, init_method=_normal(shape.init_std), config=mp_config,
            tp_group=tp_group)
        self.mp_config, self.tp_group = mp_config, tp_group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return to_decoder_layout(self.embed_tokens(input_ids), self.mp_config, self.tp_group)


class LlamaAttention(nn.Module):
    def __init__(self, shape: LlamaShape, mp_config, tp_group=None, recompute_core: bool = False):
        super().__init__()
        self.recompute_core = recompute_core
        tp = mp_config.tensor_model_parallel_size
        self.kv_per_rank = shape.kv_heads // tp
        self.group = shape.num_heads // shape.kv_heads
        self.head_dim = shape.head_dim
        self.rope_theta = shape.rope_theta
        self.attention_dropout = shape.attention_dropout
        qkv_rows = (shape.num_heads + 2 * shape.kv_heads) * shape.head_dim
        self.qkv = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, qkv_rows, config=mp_config, init_method=_normal(shape.init_std), bias=False,
            gather_output=False, tp_group=tp_group)
        self.o_proj = tensor_parallel.RowParallelLinear(
            shape.num_heads * shape.head_dim, shape.hidden_size, config=mp_config,
            init_method=_normal(shape.init_std), bias=False, input_is_parallel=True, skip_bias_add=False,
            tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv(x)                    # [seq, batch, qkv rows/TP], the whole sequence under SP
        seq, batch = qkv.shape[:2]
        qkv = qkv.view(seq, batch, self.kv_per_rank, self.group + 2, self.head_dim)
        # one split (a single gradient cat in backward) instead of a select per tensor
        q, k, v = qkv.split([self.group, 1, 1], dim=3)
        q = q.reshape(seq, batch, self.kv_per_rank * self.group, self.head_dim)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k.squeeze(3), v.squeeze(3)))   # [batch, heads, seq, head_dim]
        cos, sin = rotary_cos_sin(seq, self.head_dim, self.rope_theta, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.group > 1:      # query head j reads kv head j // group, as Hugging Face's repeat_kv
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        dropout = self.attention_dropout if self.training else 0.0
        context = attention_core(q, k, v, dropout, self.recompute_core)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, -1)
        out, _ = self.o_proj(context)
        return out


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) · up(x)), gate and up fused in one column-parallel matmul (stride 2)."""

    def __init__(self, shape: LlamaShape, mp_config, tp_group=None):
        super().__init__()
        self.gate_up = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, 2 * shape.ffn_hidden_size, config=mp_config, init_method=_normal(shape.init_std),
            bias=False, gather_output=False, stride=2, tp_group=tp_group)
        self.down_proj = tensor_parallel.RowParallelLinear(
            shape.ffn_hidden_size, shape.hidden_size, config=mp_config, init_method=_normal(shape.init_std),
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)
        out, _ = self.down_proj(swiglu(gate_up))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, mp_config, tp_group=None, recompute_attention: bool = False):
        super().__init__()
        self.dropout = shape.dropout
        self.input_layernorm = mark_sequence_parallel(RMSNorm(shape.hidden_size, shape.rms_norm_eps), mp_config)
        self.self_attn = LlamaAttention(shape, mp_config, tp_group, recompute_attention)
        self.post_attention_layernorm = mark_sequence_parallel(
            RMSNorm(shape.hidden_size, shape.rms_norm_eps), mp_config)
        self.mlp = LlamaMLP(shape, mp_config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = bias_dropout_add(self.self_attn(self.input_layernorm(x)), None, x, self.dropout, self.training)
        return bias_dropout_add(self.mlp(self.post_attention_layernorm(x)), None, x, self.dropout, self.training)


class LlamaFinalNorm(nn.Module):
    def __init__(self, shape: LlamaShape, mp_config):
        super().__init__()
        self.norm = mark_sequence_parallel(RMSNorm(shape.hidden_size, shape.rms_norm_eps), mp_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class LlamaOutputHead(nn.Module):
    def __init__(self, shape: LlamaShape, mp_config, tp_group=None):
        super().__init__()
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, shape.vocab_size, config=mp_config, init_method=_normal(shape.init_std),
            bias=False, gather_output=False, tp_group=tp_group)
        self.lm_head.vocab_parallel_output = True     # rows are the vocabulary (universal checkpoints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm_head(x)             # under SP the column-parallel head gathers the sequence itself
        return logits.transpose(0, 1)
