"""The OPT decoder, written with megatron-core tensor-parallel layers.

The model is cut into the pieces a pipeline stage can own:

    OPTTokenEmbedding   vocab-parallel token embedding; also the tied LM head (`lm_logits`)
    OPTPositions        project_in (opt-350m) + learned positions (offset 2)
    OPTDecoderLayer     pre-LN (or post-LN for opt-350m) attention + ReLU MLP, TP-split
    OPTFinalLayer       final LayerNorm (pre-LN models) and project_out (opt-350m)

Attention runs through torch's scaled_dot_product_attention (flash kernels on GPU). Fused QKV rows are
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
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from opt_ds.models.opt.shape import OPTShape, PAD_ID, POSITION_OFFSET


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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def lm_logits(embedding: OPTTokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """Tied output head: logits for this TP rank's slice of the vocabulary, [batch, seq, vocab/TP]."""
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=embedding.word_embeddings.tp_group)
    return F.linear(hidden, embedding.word_embeddings.weight)


class OPTPositions(nn.Module):
    """Adds learned absolute positions (rows 2.. of a table of max_positions + 2) to the embeddings."""

    def __init__(self, shape: OPTShape):
        super().__init__()
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
        return embeddings + self.embed_positions(positions).to(embeddings.dtype)


class OPTAttention(nn.Module):
    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.heads_per_rank = shape.num_heads // mp_config.tensor_model_parallel_size
        self.head_dim = shape.head_dim
        self.attention_dropout = shape.attention_dropout
        self.qkv = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, 3 * shape.hidden_size, config=mp_config,
            init_method=normal_init(shape.init_std), bias=True, gather_output=False, tp_group=tp_group)
        self.out_proj = tensor_parallel.RowParallelLinear(
            shape.hidden_size, shape.hidden_size, config=mp_config,
            init_method=normal_init(output_projection_std(shape)), bias=True,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv, _ = self.qkv(x)
        qkv = qkv.view(batch, seq, self.heads_per_rank, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))    # [batch, heads, seq, head_dim]
        dropout = self.attention_dropout if self.training else 0.0
        # The heads of different TP ranks are different heads: draw their dropout from the TP-rank RNG.
        with get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        context = context.transpose(1, 2).reshape(batch, seq, self.heads_per_rank * self.head_dim)
        out, _ = self.out_proj(context)
        return out


class OPTMLP(nn.Module):
    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            shape.hidden_size, shape.ffn_hidden_size, config=mp_config,
            init_method=normal_init(shape.init_std), bias=True, gather_output=False, tp_group=tp_group)
        self.fc2 = tensor_parallel.RowParallelLinear(
            shape.ffn_hidden_size, shape.hidden_size, config=mp_config,
            init_method=normal_init(output_projection_std(shape)), bias=True,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.fc1(x)
        out, _ = self.fc2(F.relu(hidden))
        return out


class OPTDecoderLayer(nn.Module):
    """One transformer block. Pre-LN: x + f(LN(x)); post-LN (opt-350m): LN(x + f(x))."""

    def __init__(self, shape: OPTShape, mp_config, tp_group=None):
        super().__init__()
        self.pre_layer_norm = shape.pre_layer_norm
        self.dropout = shape.dropout
        self.self_attn_layer_norm = _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps))
        self.self_attn = OPTAttention(shape, mp_config, tp_group)
        self.final_layer_norm = _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps))
        self.mlp = OPTMLP(shape, mp_config, tp_group)

    def _residual(self, x, norm, sublayer):
        if self.pre_layer_norm:
            return x + F.dropout(sublayer(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(sublayer(x), self.dropout, self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.self_attn_layer_norm, self.self_attn)
        return self._residual(x, self.final_layer_norm, self.mlp)


class OPTFinalLayer(nn.Module):
    """Final LayerNorm (pre-LN models only) and project_out back to the embedding width (opt-350m)."""

    def __init__(self, shape: OPTShape):
        super().__init__()
        self.final_layer_norm = _init_layer_norm(nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)) \
            if shape.has_final_layer_norm else None
        self.project_out = nn.Linear(shape.hidden_size, shape.embed_dim, bias=False) \
            if shape.has_projections else None
        if self.project_out is not None:
            with torch.no_grad():
                normal_init(shape.init_std)(self.project_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x
