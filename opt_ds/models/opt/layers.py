"""The OPT decoder, written with megatron-core tensor-parallel layers.

The model is cut into the pieces a pipeline stage can own:

    OPTTokenEmbedding   vocab-parallel token embedding; also the tied LM head (`lm_logits`)
    OPTPositions        project_in (opt-350m) + learned positions (offset 2)
    OPTDecoderLayer     pre-LN (or post-LN for opt-350m) attention + ReLU MLP, TP-split
    OPTFinalLayer       final LayerNorm (pre-LN models) and project_out (opt-350m)

Decoder layers work on [seq, batch, hidden] (opt_ds.models.sequence: the layout of megatron's sequence
parallelism); OPTPositions turns the embeddings into it and the head turns the logits back to
[batch, seq, vocab/TP]. Attention runs through opt_ds.models.attention (SDPA, flash kernels on GPU, optional
selective recompute); bias, dropout, residual and ReLU go through opt_ds.models.fused. Fused QKV rows are
ordered per head `[q_h, k_h, v_h]` (Megatron's `[np, 3, hn]`), so a TP shard is a contiguous slice of the
full matrix and resharding is a plain chunk/cat on dim 0.

Every TP layer takes the tensor-parallel group explicitly (`tp_group`, from ParallelLayout); None builds a
TP=1 model without any process group (enough to count parameters or load weights on `meta`).
The pipeline layer list is in opt_ds.models.opt.pipeline; topology and launch code are in opt_ds.parallel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import tensor_parallel

from opt_ds.models.attention import attention_core
from opt_ds.models.fused import bias_dropout_add, bias_relu
from opt_ds.models.opt.shape import OPTShape, PAD_ID, POSITION_OFFSET
from opt_ds.models.sequence import mark_sequence_parallel, to_decoder_layout, to_vocab_parallel_head


def normal_init(std: float):
    def init(tensor):
        return nn.init.normal_(tensor, mean=0.0, std=std)
    return init


def output_projection_std(shape: OPTShape) -> float:
    """OPT scales the init of each layer's output projections (out_proj, fc2) by 1/sqrt(2L)."""
    return shape.init_std / math.sqrt(2.0 * shape.num_layers)


def _init_layer_norm(norm: nn.LayerNorm) -> nn.LayerNorm:
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    return norm


def _zero_padding_row(init):
    def init_with_padding(tensor):
        init(tensor)
        with torch.no_grad():
            tensor[PAD_ID].zero_()
        return tensor
    return init_with_padding


class OPTTokenEmbedding(nn.Module):
    """Token embedding split over TP ranks by vocabulary rows. Tied with the LM head."""

    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            shape.vocab_size, shape.embed_dim,
            init_method=_zero_padding_row(normal_init(shape.init_std)), config=mp_config, tp_group=tp_group)
        self.mp_config = mp_config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def lm_logits(embedding: OPTTokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """Tied output head: logits for this TP rank's slice of the vocabulary, [batch, seq, vocab/TP] (a view of
    the [seq, batch, vocab/TP] result)."""
    hidden = to_vocab_parallel_head(hidden, embedding.mp_config, embedding.word_embeddings.tp_group)
    return F.linear(hidden, embedding.word_embeddings.weight).transpose(0, 1)


class OPTPositions(nn.Module):
    """Adds learned absolute positions (rows 2.. of a table of max_positions + 2) to the embeddings, and hands
    them to the decoder layers as [seq, batch, hidden] (this rank's part of the sequence under SP)."""

    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.mp_config, self.tp_group = mp_config, tp_group
        self.project_in = nn.Linear(shape.embed_dim, shape.hidden_size, bias=False) \
            if shape.has_projections else None
        self.embed_positions = nn.Embedding(shape.max_position_embeddings + POSITION_OFFSET, shape.hidden_size)
        init = normal_init(shape.init_std)
        with torch.no_grad():
            init(self.embed_positions.weight)
            self.embed_positions.weight[PAD_ID].zero_()
            if self.project_in is not None:
                init(self.project_in.weight)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.project_in is not None:
            embeddings = self.project_in(embeddings)
        seq_len = embeddings.shape[1]
        positions = torch.arange(POSITION_OFFSET, seq_len + POSITION_OFFSET, device=embeddings.device)
        embeddings = embeddings + self.embed_positions(positions).to(embeddings.dtype)
        return to_decoder_layout(embeddings, self.mp_config, self.tp_group)


class OPTAttention(nn.Module):
    """Returns the output projection without its bias, which the caller adds fused with dropout and residual."""

    def __init__(self, shape: OPTShape, mp_config, tp_group=None, recompute_core: bool = False):
        super().__init__()
        self.recompute_core = recompute_core
        self.heads_per_rank = shape.num_heads // mp_config.tensor_model_parallel_size
        self.head_dim = shape.head_dim
        self.attention_dropout = shape.attention_dropout
        self.qkv = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, 3 * shape.hidden_size, config=mp_config,
            init_method=normal_init(shape.init_std), bias=True, gather_output=False, tp_group=tp_group)
        self.out_proj = tensor_parallel.RowParallelLinear(
            shape.hidden_size, shape.hidden_size, config=mp_config,
            init_method=normal_init(output_projection_std(shape)), bias=True,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)

    def forward(self, x: torch.Tensor):
        qkv, _ = self.qkv(x)                    # [seq, batch, 3·hidden/TP], the whole sequence under SP
        seq, batch = qkv.shape[:2]
        # unbind: one stacked gradient in backward (a select per tensor zero-fills a full-size one each)
        q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.view(seq, batch, self.heads_per_rank, 3, self.head_dim)
                   .unbind(3))                  # [batch, heads, seq, head_dim]
        dropout = self.attention_dropout if self.training else 0.0
        context = attention_core(q, k, v, dropout, self.recompute_core)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_per_rank * self.head_dim)
        return self.out_proj(context)


class OPTMLP(nn.Module):
    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, shape.ffn_hidden_size, config=mp_config,
            init_method=normal_init(shape.init_std), bias=True, gather_output=False, skip_bias_add=True,
            tp_group=tp_group)
        self.fc2 = tensor_parallel.RowParallelLinear(
            shape.ffn_hidden_size, shape.hidden_size, config=mp_config,
            init_method=normal_init(output_projection_std(shape)), bias=True,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)

    def forward(self, x: torch.Tensor):
        """fc2's output and bias (added by the caller, fused with dropout and residual)."""
        hidden, bias = self.fc1(x)
        return self.fc2(bias_relu(hidden, bias))


class OPTDecoderLayer(nn.Module):
    """One transformer block. Pre-LN: x + f(LN(x)); post-LN (opt-350m): LN(x + f(x))."""

    def __init__(self, shape: OPTShape, mp_config, tp_group=None, recompute_attention: bool = False):
        super().__init__()
        self.pre_layer_norm = shape.pre_layer_norm
        self.dropout = shape.dropout
        self.self_attn_layer_norm = mark_sequence_parallel(
            _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)), mp_config)
        self.self_attn = OPTAttention(shape, mp_config, tp_group, recompute_attention)
        self.final_layer_norm = mark_sequence_parallel(
            _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)), mp_config)
        self.mlp = OPTMLP(shape, mp_config, tp_group)

    def _residual(self, x, norm, sublayer):
        if self.pre_layer_norm:
            out, bias = sublayer(norm(x))
            return bias_dropout_add(out, bias, x, self.dropout, self.training)
        out, bias = sublayer(x)
        return norm(bias_dropout_add(out, bias, x, self.dropout, self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.self_attn_layer_norm, self.self_attn)
        return self._residual(x, self.final_layer_norm, self.mlp)


class OPTFinalLayer(nn.Module):
    """Final LayerNorm (pre-LN models only) and project_out back to the embedding width (opt-350m)."""

    def __init__(self, shape: OPTShape, mp_config):
        super().__init__()
        self.final_layer_norm = _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)) \
            if shape.has_final_layer_norm else None
        self.project_out = nn.Linear(shape.hidden_size, shape.embed_dim, bias=False) \
            if shape.has_projections else None
        if self.project_out is not None:
            with torch.no_grad():
                normal_init(shape.init_std)(self.project_out.weight)
        mark_sequence_parallel(self, mp_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x
