"""Assemble the OPT decoder into a DeepSpeed PipelineModule.

Layer list (the index is the `layer_XX` number of DeepSpeed's checkpoint files):

    0      TiedLayerSpec('embed', OPTTokenEmbedding)            token embedding (owner of the tied weight)
    1      OPTPositions                                          project_in + learned positions
    2..L+1 OPTDecoderLayer x L
    L+2    OPTFinalLayer                                         final LayerNorm / project_out
    L+3    TiedLayerSpec('embed', forward_fn=lm_logits)          tied LM head (no file of its own)

Stages are balanced by counting decoder layers. DeepSpeed reduces the tied embedding's gradient across
the first and last stage before the data-parallel reduction, so the copies stay bit-identical.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.parallel_state import get_tensor_model_parallel_rank

from opt_ds.models.opt import (OPTDecoderLayer, OPTFinalLayer, OPTPositions, OPTTokenEmbedding, lm_logits)
from opt_ds.models.presets import OPTShape

TIED_EMBEDDING_KEY = "embed"
TIED_WEIGHT = "word_embeddings.weight"
FIRST_DECODER_LAYER = 2


def decoder_layer_index(layer: int) -> int:
    """Index in the pipeline's layer list (and checkpoint file number) of decoder layer `layer`."""
    return FIRST_DECODER_LAYER + layer


def final_layer_index(shape: OPTShape) -> int:
    return FIRST_DECODER_LAYER + shape.num_layers


def lm_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked tokens, from vocab-parallel logits."""
    targets, loss_mask = labels
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
    loss_mask = loss_mask.to(losses.dtype)
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


def layer_specs(shape: OPTShape, mp_config) -> list:
    return [
        TiedLayerSpec(TIED_EMBEDDING_KEY, OPTTokenEmbedding, shape, mp_config, tied_weight_attr=[TIED_WEIGHT]),
        LayerSpec(OPTPositions, shape),
        *[LayerSpec(OPTDecoderLayer, shape, mp_config) for _ in range(shape.num_layers)],
        LayerSpec(OPTFinalLayer, shape),
        TiedLayerSpec(TIED_EMBEDDING_KEY, OPTTokenEmbedding, shape, mp_config,
                      forward_fn=lm_logits, tied_weight_attr=[TIED_WEIGHT]),
    ]


def build_pipeline(shape: OPTShape, layout, *, seed: int = 1234, activation_checkpoint_interval: int = 0,
                   partition_method: str = "type:OPTDecoderLayer") -> PipelineModule:
    """The OPT PipelineModule for this process's stage. `layout.initialize()` must have run."""
    return PipelineModule(
        layers=layer_specs(shape, layout.megatron_config()),
        topology=layout.topology(),
        loss_fn=lm_loss,
        seed_layers=True,
        seed_fn=seed_all,
        base_seed=seed,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["OPTDecoderLayer"],
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
    starts = range(0, len(funcs), interval)
    return sum(sum(isinstance(f, OPTDecoderLayer) for f in funcs[start:start + interval])
               for start, checkpointed in zip(starts, pipeline_module.is_checkpointable_results) if checkpointed)


def count_parameters(shape: OPTShape) -> int:
    """Parameters of the full model, counted by building each distinct layer on the meta device (nothing is
    allocated, so opt-175b is counted in milliseconds). Needs megatron's parallel_state at TP=1."""
    from opt_ds.parallel.layout import ParallelLayout
    mp_config = ParallelLayout().megatron_config()
    mp_config.perform_initialization = False
    mp_config.use_cpu_initialization = True
    counted_keys, cache, total = set(), {}, 0
    for spec in layer_specs(shape, mp_config):
        if isinstance(spec, TiedLayerSpec):
            if spec.key in counted_keys:
                continue
            counted_keys.add(spec.key)
        if spec.typename not in cache:
            with torch.device("meta"):
                cache[spec.typename] = sum(p.numel() for p in spec.build().parameters())
        total += cache[spec.typename]
    return total
