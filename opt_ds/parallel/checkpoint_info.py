"""What a training checkpoint must record about the model, besides its weights.

DeepSpeed's pipeline checkpoints hold tensors only; the number of attention heads, the LayerNorm placement
and the vocabulary padding cannot be read back from them. The trainer therefore saves

    engine.save_checkpoint(save_dir, tag=..., client_state={**checkpoint_client_state(shape), ...})

which puts two entries in every `mp_rank_XX_model_states.pt`:

  * `opt_model_shape`: the model's shape dataclass as a dict and `model_family` its family, so converters
    rebuild the exact model;
  * `universal_checkpoint_info`: the parameter patterns DeepSpeed's `ds_to_universal` needs to merge the
    ZeRO optimizer state of a TP x PP x DP run into a layout-free "universal" checkpoint, from which
    training resumes at any other layout (`"checkpoint": {"load_universal": true}`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from opt_ds.models.family import family_named, family_of

MODEL_SHAPE_KEY = "opt_model_shape"
MODEL_FAMILY_KEY = "model_family"
UNIVERSAL_INFO_KEY = "universal_checkpoint_info"   # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO


def universal_checkpoint_info(shape, original_vocab_size: Optional[int] = None) -> dict:
    """DeepSpeed universal-checkpoint patterns for the parameter names of `opt_ds.parallel.pipe`.

    Parameter names are `tied_modules.<key>.<name>` for a tied embedding (present on the first and the last
    stage) and `<layer index>.<name inside the layer>` for everything else. The patterns are derived from
    megatron's TP attributes (`opt_ds.parallel.pipe.tensor_parallel_dims`): replicated tensors, tensors split
    on dim 1 (row-parallel), vocabulary tensors, and column-parallel tensors made of two sub-tensors
    (partition_stride 2: LLaMA's [gate_shard; up_shard]). Other column-parallel tensors need no pattern
    (DeepSpeed's default concatenates on dim 0); fused QKV rows are grouped per head so that is right.
    Every pattern matches a parameter, as ds_to_universal requires.
    """
    from deepspeed.checkpoint import constants as uc
    from opt_ds.parallel.pipe import tensor_parallel_dims

    splits = tensor_parallel_dims(shape)
    replicated = sorted({_name_pattern(n) for n, s in splits.items() if s.dim is None})
    row_parallel = sorted({_name_pattern(n) for n, s in splits.items() if s.dim == 1})
    vocabulary = sorted({_name_pattern(n) for n, s in splits.items() if s.vocab})
    two_sub_params = sorted({_name_pattern(n) for n, s in splits.items() if s.dim == 0 and s.stride == 2})
    tied_key = family_of(shape).tied_embedding_key
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.ORIGINAL_VOCAB_SIZE: original_vocab_size or shape.vocab_size,
        uc.PADDED_VOCAB_SIZE: shape.vocab_size,
        uc.VOCABULARY_PARAMETER_PATTERNS: vocabulary,
        uc.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [rf"tied_modules\.{tied_key}\."] if tied_key else [],
        uc.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        **({uc.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: two_sub_params} if two_sub_params else {}),
    }


def _name_pattern(name: str) -> str:
    r"""`12.mlp.fc2.weight` -> `\d+\.mlp\.fc2\.weight$`: one pattern for the same tensor of every layer."""
    index, _, rest = name.partition(".")
    return (r"\d+\." + re.escape(rest) if index.isdigit() else re.escape(name)) + "$"


def checkpoint_client_state(shape, original_vocab_size: Optional[int] = None) -> dict:
    """The client_state entries every opt_ds checkpoint carries (see the module docstring)."""
    return {MODEL_SHAPE_KEY: dataclasses.asdict(shape), MODEL_FAMILY_KEY: family_of(shape).name,
            UNIVERSAL_INFO_KEY: universal_checkpoint_info(shape, original_vocab_size)}


def shape_from_client_state(state: dict):
    """The shape saved by `checkpoint_client_state`, or None when the checkpoint has none. Checkpoints
    written before the family seam are OPT's."""
    fields = state.get(MODEL_SHAPE_KEY)
    if not isinstance(fields, dict):
        return None
    family = family_named(state.get(MODEL_FAMILY_KEY, "opt"))
    known = family.shape_fields()
    return family.shape_type(**{k: v for k, v in fields.items() if k in known})
