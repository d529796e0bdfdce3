"""What a training checkpoint must record about the model, besides its weights.

DeepSpeed's pipeline checkpoints hold tensors only; the number of attention heads, the LayerNorm placement
and the vocabulary padding cannot be read back from them. The trainer therefore saves

    engine.save_checkpoint(save_dir, tag=..., client_state={**checkpoint_client_state(shape), ...})

which puts two entries in every `mp_rank_XX_model_states.pt`:

  * `opt_model_shape`: the OPTShape as a dict, so converters rebuild the exact model;
  * `universal_checkpoint_info`: the parameter patterns DeepSpeed's `ds_to_universal` needs to merge the
    ZeRO optimizer state of a TP x PP x DP run into a layout-free "universal" checkpoint, from which
    training resumes at any other layout (`"checkpoint": {"load_universal": true}`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from opt_ds.models.presets import OPTShape

MODEL_SHAPE_KEY = "opt_model_shape"
UNIVERSAL_INFO_KEY = "universal_checkpoint_info"   # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO


def universal_checkpoint_info(shape: OPTShape, original_vocab_size: Optional[int] = None) -> dict:
    """DeepSpeed universal-checkpoint patterns for the parameter names of `opt_ds.parallel.pipe`.

    Parameter names are `tied_modules.embed.word_embeddings.weight` (vocab-parallel rows, present on the
    first and the last stage) and `<layer index>.<name inside the layer>` for everything else. Fused QKV and
    fc1 are column-parallel with Megatron's per-head layout, so DeepSpeed's default (concatenate on dim 0)
    is right for them; only replicated and row-parallel tensors need naming. A pattern that matches no
    parameter makes ds_to_universal fail, so the lists depend on the shape (opt-350m has projections and
    no final LayerNorm).
    """
    from deepspeed.checkpoint import constants as uc

    replicated = [r"\d+\.embed_positions\.weight$", r"\d+\.self_attn_layer_norm\.(weight|bias)$",
                  r"\d+\.final_layer_norm\.(weight|bias)$", r"\d+\.self_attn\.out_proj\.bias$",
                  r"\d+\.mlp\.fc2\.bias$"]
    if shape.has_projections:
        replicated += [r"\d+\.project_in\.weight$", r"\d+\.project_out\.weight$"]
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.ORIGINAL_VOCAB_SIZE: original_vocab_size or shape.vocab_size,
        uc.PADDED_VOCAB_SIZE: shape.vocab_size,
        uc.VOCABULARY_PARAMETER_PATTERNS: [r"tied_modules\.embed\.word_embeddings\.weight$"],
        uc.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules\.embed\."],
        uc.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r"\d+\.self_attn\.out_proj\.weight$",
                                                     r"\d+\.mlp\.fc2\.weight$"],
    }


def checkpoint_client_state(shape: OPTShape, original_vocab_size: Optional[int] = None) -> dict:
    """The client_state entries every opt_ds checkpoint carries (see the module docstring)."""
    return {MODEL_SHAPE_KEY: dataclasses.asdict(shape),
            UNIVERSAL_INFO_KEY: universal_checkpoint_info(shape, original_vocab_size)}


def shape_from_client_state(state: dict) -> Optional[OPTShape]:
    """The OPTShape saved by `checkpoint_client_state`, or None when the checkpoint has none."""
    fields = state.get(MODEL_SHAPE_KEY)
    if not isinstance(fields, dict):
        return None
    known = {f.name for f in dataclasses.fields(OPTShape)}
    return OPTShape(**{k: v for k, v in fields.items() if k in known})
