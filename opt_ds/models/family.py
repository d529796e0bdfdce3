"""Model families: the one seam between a decoder architecture and the rest of opt_ds.

Each family lives in its own package (`opt_ds.models.opt`, `opt_ds.models.llama`) and exports one
`ModelFamily` object, `FAMILY`. Config, pipeline assembly, training, bench, checkpoints and conversion ask
the family of a shape (`family_of(shape)`) or of a name (`family_named`) for what differs between
architectures; none of them tests a family's name.

What a family provides:
  * a frozen shape dataclass (`shape_type`) and its named presets;
  * its pipeline layer list (DeepSpeed LayerSpecs: embedding, decoder layers, final norm, head) and the
    single-device model assembled from the same pieces;
  * its parameter count (analytic) and its general shape description (FLOPs, projection, planner);
  * the shape fields tensor parallelism must divide.
Which tensors are TP-split, and on which dim, is not a family fact: megatron-core's layers mark their
parameters (`tensor_model_parallel`, `partition_dim`), and `opt_ds.models.tensor_layout` reads them.

This module is imported by the config loader, so it imports no torch/megatron; the layers load lazily.
"""
from __future__ import annotations

from typing import Dict, Optional


from opt_ds.models.opt.shape import POSITION_OFFSET, OPTShape
from opt_ds.models.shape import DecoderShape
from opt_ds.models.protocol import DECODER_PARTITION_METHOD, ModelFamily, Preset  # noqa: F401


def families() -> Dict[str, ModelFamily]:
    from opt_ds.models.llama import FAMILY as LLAMA
    from opt_ds.models.opt import FAMILY as OPT
    return {OPT.name: OPT, LLAMA.name: LLAMA}


def family_named(name: str) -> ModelFamily:
    known = families()
    if name not in known:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(known)}")
    return known[name]


def family_of(shape) -> ModelFamily:
    for family in families().values():
        if isinstance(shape, family.shape_type):
            return family
    raise TypeError(f"{type(shape).__name__} is the shape of no model family")


def all_presets() -> Dict[str, Preset]:
    return {name: preset for family in families().values() for name, preset in family.presets.items()}


def get_preset(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


def family_of_preset(name: str) -> ModelFamily:
    return family_of(get_preset(name).shape)


def as_decoder_shape(shape) -> DecoderShape:
    """A family's shape (OPTShape, LlamaShape, ...) in general terms; a DecoderShape as it is."""
    if isinstance(shape, DecoderShape):
        return shape
    return family_of(shape).decoder_shape(shape)


def to_opt(shape: DecoderShape) -> Optional[OPTShape]:
    """The OPTShape that `as_decoder_shape` maps to `shape`, or None when the shape is not an OPT shape."""
    if shape.position_rows <= POSITION_OFFSET:
        return None
    opt = OPTShape(shape.num_layers, shape.hidden_size, shape.num_heads, shape.ffn_hidden_size, shape.vocab_size,
                   max_position_embeddings=shape.position_rows - POSITION_OFFSET, word_embed_proj_dim=shape.embed_dim,
                   pre_layer_norm=shape.final_norm)
    return opt if as_decoder_shape(opt) == shape else None
