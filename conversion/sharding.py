"""Tensor-parallel cutting and gluing, and the two fused-QKV layouts.

opt_ds (Megatron `[np, 3, hn]`): rows grouped per head as `[q_h; k_h; v_h]`; a TP shard is a contiguous
    run of heads, so sharding is a plain chunk on dim 0.
metaseq (`qkv_proj`): each MP part holds `[K_i; V_i; Q_i]`, three blocks of that part's heads, in the
    order K, V, Q despite the name (ModelParallelMultiheadAttention.forward splits `k, v, q`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from conversion.files import ConversionError


def chunk(tensor: torch.Tensor, parts: int, dim: int = 0) -> List[torch.Tensor]:
    """`parts` equal contiguous pieces (cloned: torch.save of a view would write the whole storage)."""
    if tensor.shape[dim] % parts:
        raise ConversionError(f"cannot split dimension {dim} of size {tensor.shape[dim]} into {parts} equal parts")
    return [piece.clone() for piece in torch.chunk(tensor, parts, dim=dim)]


def fuse_qkv_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF q, k, v (weight [H, H] or bias [H]) -> opt_ds fused [3H, ...] in `[np, 3, hn]` row order."""
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(num_heads, -1, *rest) for t in (q, k, v)], dim=1)
    return stacked.reshape(3 * q.shape[0], *rest)


def split_qkv_per_head(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """opt_ds fused `[np, 3, hn]` (full, all heads) -> HF q, k, v."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_heads, 3, -1, *rest)
    return tuple(grouped[:, i].reshape(-1, *rest).clone() for i in range(3))


def metaseq_kvq_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int) -> List[torch.Tensor]:
    """HF q, k, v -> metaseq `qkv_proj` of each MP part: cat(K_i, V_i, Q_i)."""
    ks, vs, qs = (chunk(t, parts) for t in (k, v, q))
    return [torch.cat([ks[i], vs[i], qs[i]], dim=0) for i in range(parts)]


def merge_metaseq_kvq(part_tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """metaseq `qkv_proj` of every MP part (in part order) -> HF q, k, v."""
    ks, vs, qs = [], [], []
    for fused in part_tensors:
        if fused.shape[0] % 3:
            raise ConversionError(f"a fused qkv_proj has {fused.shape[0]} rows, not a multiple of 3")
        k, v, q = torch.split(fused, fused.shape[0] // 3, dim=0)
        ks.append(k)
        vs.append(v)
        qs.append(q)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def padded_rows(rows: int, multiple: int) -> int:
    """`rows` rounded up to a multiple of `multiple` (the vocabulary rows a TP degree can split evenly)."""
    return -(-rows // multiple) * multiple


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to `rows` (DeepSpeed's universal checkpoints re-pad vocabularies with zeros too)."""
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, padding], dim=0)


def check_same(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """A replicated tensor must be identical on every TP rank; return the first copy."""
    first = tensors[0]
    for rank, other in enumerate(tensors[1:], start=1):
        if other.shape != first.shape or not torch.equal(other, first):
            raise ConversionError(f"{what} should be identical on every tensor-parallel rank but rank {rank} "
                                  "differs from rank 0; the checkpoint is inconsistent (mixed files from "
                                  "different runs?)")
    return first


def merge_shards(shards, dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from its TP shards. With stride s the full tensor is s sub-tensors (e.g. [gate; up])
    and each shard holds its slice of every one of them, in order: [a_r; b_r]."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([piece[j] for j in range(stride) for piece in pieces], dim=dim)


def split_full(full: torch.Tensor, dim: int, parts: int, stride: int = 1) -> list:
    """The inverse of `merge_shards`: the `parts` TP shards of a full tensor."""
    subs = [sub.chunk(parts, dim=dim) for sub in full.chunk(stride, dim=dim)]
    return [torch.cat([sub[rank] for sub in subs], dim=dim) for rank in range(parts)]
