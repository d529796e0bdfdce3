"""Assemble a model family's layer list into a DeepSpeed PipelineModule, and the single-device model.

The layer list comes from the family (opt_ds.models.<family>.pipeline); its index is the `layer_XX` number
of DeepSpeed's checkpoint files. Stages are balanced by counting decoder layers.

Between the embedding and the head the activations are [seq, batch, hidden] (opt_ds.models.sequence); the
head returns [batch, seq, vocab/TP] logits as a view of its [seq, batch, vocab/TP] result.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.parallel_state import get_tensor_model_parallel_rank

from opt_ds.models.family import DECODER_PARTITION_METHOD, family_of
from opt_ds.models.sequence import sequence_parallel_parameters


def final_layer_index(shape) -> int:
    """Index in the pipeline's layer list (and checkpoint file number) of the layer after the decoders."""
    return family_of(shape).final_layer_index(shape)


def lm_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked tokens, from vocab-parallel logits [batch, seq, vocab/TP].

    The logits are read in the head's own [seq, batch] order (no copy; the small targets are transposed
    instead). megatron's cross-entropy makes the one fp32 buffer the loss needs (bf16/fp16 logits: an fp32
    copy; fp32 logits: none) and works on it in place, keeping it as the softmax for backward; casting here
    first would only move that copy."""
    targets, loss_mask = labels
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1), targets.transpose(0, 1).contiguous())
    loss_mask = loss_mask.transpose(0, 1).to(losses.dtype)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def seed_all(seed: int) -> None:
    """Seed the default generator (shared by the TP ranks, for replicated activations) and megatron's
    model-parallel generator (distinct per TP rank, for attention-probability dropout).

    DeepSpeed calls this with base_seed + layer index before building each layer (so the initial weights
    depend only on the layer, not on the stage that builds it), and with a seed derived from the
    micro-batch count and layer before each forward (so dropout masks are reproducible on resume and on
    activation recompute).
    """
    seed = int(seed)
    torch.manual_seed(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + get_tensor_model_parallel_rank())


class DecoderPipeline(PipelineModule):
    """DeepSpeed's PipelineModule, whose tied-weight gradient reduction also sums the gradients of the
    sequence-parallel parameters (norms, row-parallel biases) over the TP group.

    DeepSpeed's engine all-reduces each (weight, group) that `get_tied_weights_and_groups` lists once per
    step, after the last backward and before the data-parallel reduction, on the gradient the optimizer
    reads (the fp32 accumulation under bf16): the one place such a reduction belongs, so it rides there."""

    def get_tied_weights_and_groups(self):
        tied = super().get_tied_weights_and_groups()
        from megatron.core import parallel_state
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return tied
        group = parallel_state.get_tensor_model_parallel_group()
        return tied + [(param, group) for param in sequence_parallel_parameters(self)]


def build_pipeline(shape, layout, *, seed: int = 1234, activation_checkpoint_interval: int = 0,
                   partition_method: str = DECODER_PARTITION_METHOD, recompute_attention: bool = False,
                   sequence_parallel: bool = False) -> PipelineModule:
    """The PipelineModule of `shape`'s family for this process's stage. `layout.initialize()` must have run.
    `activation_checkpoint_interval` > 0: full recompute; `recompute_attention`: selective recompute."""
    family = family_of(shape)
    return DecoderPipeline(
        layers=family.layer_specs(shape, layout.megatron_config(sequence_parallel=sequence_parallel),
                                  layout.tensor_group(), recompute_attention),
        topology=layout.topology(),
        loss_fn=lm_loss,
        seed_layers=True,
        seed_fn=seed_all,
        base_seed=seed,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=[family.decoder_layer_name],
    )


def recomputed_decoder_layers(pipeline_module) -> int:
    """Decoder layers of this stage whose forward DeepSpeed re-runs in backward.

    DeepSpeed checkpoints the stage's layer list in blocks of `activation_checkpoint_interval` and skips
    blocks that hold a non-checkpointable layer (the embedding, the head); its own per-block decision
    (`is_checkpointable_results`) is read here rather than re-derived.
    """
    interval = pipeline_module.activation_checkpoint_interval
    if interval == 0:
        return 0
    funcs = pipeline_module.forward_funcs
    decoder = set(pipeline_module.checkpointable_layers)
    starts = range(0, len(funcs), interval)
    return sum(sum(type(f).__name__ in decoder for f in funcs[start:start + interval])
               for start, checkpointed in zip(starts, pipeline_module.is_checkpointable_results) if checkpointed)


def single_device_model(shape, mp_config=None) -> torch.nn.Sequential:
    """The whole model at TP=1 as one nn.Sequential of the pipeline pieces, with no process group.

    Its children are named by their pipeline layer index (a tied head shares the embedding's module and is
    not a child of its own). Built under `torch.device("meta")` nothing is allocated.
    """
    if mp_config is None:
        mp_config = _meta_megatron_config()
    modules, tied = torch.nn.Sequential(), {}
    for index, spec in enumerate(family_of(shape).layer_specs(shape, mp_config)):
        if isinstance(spec, TiedLayerSpec):
            if spec.key in tied:
                continue
            tied[spec.key] = index
        modules.add_module(str(index), spec.build())
    return modules


class TensorSplit(NamedTuple):
    dim: Optional[int]      # the dim split across TP ranks; None: every TP rank holds the whole tensor
    stride: int             # sub-tensors the full tensor is made of, each split alike (gate/up: 2)
    vocab: bool             # rows are the vocabulary (padded to the model's vocab_size)


def tensor_parallel_dims(shape) -> Dict[str, TensorSplit]:
    """{PipelineModule parameter name: how it is split across TP ranks}.

    Read from the attributes megatron-core's layers put on their parameters (`tensor_model_parallel`,
    `partition_dim`), on a meta-device model, so no table of names is kept by hand.
    """
    with torch.device("meta"):
        mp_config = _meta_megatron_config()
        model = single_device_model(shape, mp_config)
    tied = {str(index): key for index, key in _tied_indices(shape).items()}
    vocab = {id(m.weight) for m in model.modules()
             if isinstance(m, tensor_parallel.VocabParallelEmbedding) or getattr(m, "vocab_parallel_output", False)}
    dims = {}
    for name, param in model.named_parameters():
        index, rest = name.split(".", 1)
        pipeline_name = f"tied_modules.{tied[index]}.{rest}" if index in tied else name
        split = getattr(param, "tensor_model_parallel", False)
        dims[pipeline_name] = TensorSplit(param.partition_dim if split else None,
                                          getattr(param, "partition_stride", 1), id(param) in vocab)
    return dims


def _meta_megatron_config():
    from opt_ds.parallel.layout import ParallelLayout
    # Initialisation runs (on meta, so it costs nothing) because megatron sets the TP attributes there.
    return ParallelLayout().megatron_config()


def _tied_indices(shape) -> dict:
    """{pipeline layer index: tied key} of the first spec of each tied key."""
    found = {}
    for index, spec in enumerate(family_of(shape).layer_specs(shape, _meta_megatron_config())):
        if isinstance(spec, TiedLayerSpec) and spec.key not in found.values():
            found[index] = spec.key
    return found
