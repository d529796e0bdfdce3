"""The decoder layers' activation layout, [seq, batch, hidden] (megatron-core's), and sequence parallelism.

Every decoder layer takes and returns [seq, batch, hidden]: megatron's tensor-parallel layers split and
gather activations along the first dim under sequence parallelism. The first pipeline piece turns the
embeddings [batch, seq, hidden] into that layout, the head turns the logits back.

With sequence parallelism (megatron's, `sequence_parallel=True` in the ModelParallelConfig, TP > 1) the
activations between layers are split along the sequence over the TP ranks: the norms, dropout and residual
adds work on s/t tokens; each column-parallel linear all-gathers its input and each row-parallel linear
reduce-scatters its output (the same bytes as the all-reduce they replace). The parameters that act on
the split activations — norms, row-parallel biases, opt-350m's project_out — see only their rank's tokens,
so their gradients are summed over the TP group after backward (`sequence_parallel` attribute, as megatron
marks them; opt_ds.parallel.pipe hands them to DeepSpeed's gradient reduction).
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def sequence_parallel(mp_config) -> bool:
    return bool(mp_config.sequence_parallel) and mp_config.tensor_model_parallel_size > 1


def to_decoder_layout(hidden: torch.Tensor, mp_config, tp_group) -> torch.Tensor:
    """[batch, seq, hidden] embeddings -> [seq, batch, hidden], this rank's part of the sequence under SP."""
    hidden = hidden.transpose(0, 1).contiguous()
    if sequence_parallel(mp_config):
        hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=tp_group)
    return hidden


def to_vocab_parallel_head(hidden: torch.Tensor, mp_config, tp_group) -> torch.Tensor:
    """The input of a vocab-parallel head that is not a megatron linear (OPT's tied head): the whole
    sequence on every TP rank, and its gradient summed over the TP ranks' vocabulary slices."""
    if sequence_parallel(mp_config):
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                                    group=tp_group)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def mark_sequence_parallel(module: torch.nn.Module, mp_config) -> torch.nn.Module:
    """Mark the parameters of a module that runs on the split sequence (norms, project_out)."""
    if sequence_parallel(mp_config):
        for param in module.parameters():
            param.sequence_parallel = True
    return module


def sequence_parallel_parameters(module: torch.nn.Module) -> list:
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]
