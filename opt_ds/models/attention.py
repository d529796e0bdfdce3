"""The attention core shared by the families: softmax(QKᵀ/√d)·V through torch's scaled_dot_product_attention
(flash kernels on GPU), with the dropout drawn from megatron's model-parallel RNG (the heads of different TP
ranks are different heads), and optionally recomputed in backward instead of stored (selective recompute).

Selective recompute (Megatron's "selective" granularity) keeps the Q, K, V inputs of the core and re-runs
only the core in backward: with unfused attention that frees the s² scores and probabilities, the largest
activation of long sequences, for ~3 % more FLOPs; with flash kernels it frees the kernel's small
log-sum-exp and output. The replayed dropout mask must be the original one, so the model-parallel RNG
states are put back to what they were before the forward for the replay, and restored after it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.utils.checkpoint import checkpoint


def _core(q, k, v, dropout: float):
    with get_cuda_rng_tracker().fork():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


@contextlib.contextmanager
def _model_parallel_rng_as(states):
    tracker = get_cuda_rng_tracker()
    current = tracker.get_states()
    tracker.set_states(dict(states))     # a copy: the replay's fork must not advance the snapshot
    try:
        yield
    finally:
        tracker.set_states(current)


def attention_core(q, k, v, dropout: float, recompute: bool) -> torch.Tensor:
    """Causal attention of [batch, heads, seq, head_dim] queries, keys and values."""
    if not (recompute and torch.is_grad_enabled()):
        return _core(q, k, v, dropout)
    states = get_cuda_rng_tracker().get_states()
    # torch's checkpoint restores the default generators itself; the model-parallel states are ours to replay.
    return checkpoint(_core, q, k, v, dropout, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (contextlib.nullcontext(), _model_parallel_rng_as(states)))
