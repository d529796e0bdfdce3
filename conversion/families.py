"""What the converters need to know of each model family, in one table: the canonical (Hugging Face) tensor
names and shapes, and how they map onto opt_ds's pipeline layer states, gathered from the family modules
(conversion.opt, conversion.llama). The formats (hf, opt_ds, universal, verify) look the family of a shape up
here rather than testing its name; the family modules never import this module or a format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from opt_ds.models.family import family_of


@dataclass(frozen=True)
class FamilyNames:
    layer_prefix: str                   # canonical key of decoder layer N: f"{layer_prefix}{N}.{name}"
    layer_shapes: Callable              # shape -> {name inside a layer: tensor shape}
    global_shapes: Callable             # shape -> {canonical key: tensor shape} outside the layers
    describe: Callable                  # shape -> one line for the console
    global_names: Dict[str, Tuple[str, str]]    # canonical key -> (pipeline layer role, name inside it)
    layer_roles: Callable               # shape -> {role: pipeline layer index}
    vocab_keys: Tuple[str, ...]         # canonical keys whose rows are the (TP-padded) vocabulary
    decoder_to_opt_ds: Callable         # (canonical layer, shape) -> opt_ds layer state
    decoder_from_opt_ds: Callable       # (opt_ds layer state, shape) -> canonical layer
    hf_model_type: str                  # config.json model_type
    hf_shape_from_config: Callable      # (config.json dict, where) -> shape; refuses what opt_ds lacks
    hf_config_from_shape: Callable      # (shape, torch dtype) -> config.json dict
    hf_special_ids: Dict[str, int]      # generation_config.json
    hf_tied_head: bool                  # no lm_head.weight of its own
    hf_reference: Callable              # Checkpoint -> forward(ids) -> logits of transformers' model of it
    hf_class: str                       # that model's class name


def _opt() -> FamilyNames:
    from conversion import opt as O
    return FamilyNames(O.LAYER_PREFIX, O.layer_shapes, O.global_shapes, O.describe_shape, O.GLOBAL_NAMES,
                       O.layer_roles, O.VOCAB_KEYS, O.decoder_to_opt_ds, O.decoder_from_opt_ds,
                       "opt", O.shape_from_config, O.config_from_shape, O.SPECIAL_IDS, True, O.hf_reference,
                       "OPTForCausalLM")


def _llama() -> FamilyNames:
    from conversion import llama as L
    return FamilyNames(L.LAYER_PREFIX, L.layer_shapes, L.global_shapes, L.describe_shape, L.GLOBAL_NAMES,
                       L.layer_roles, L.VOCAB_KEYS, L.decoder_to_opt_ds, L.decoder_from_opt_ds,
                       "llama", L.shape_from_config, L.config_from_shape, L.SPECIAL_IDS, False, L.hf_reference,
                       "LlamaForCausalLM")


_BUILDERS = {"opt": _opt, "llama": _llama}


def names_of(shape) -> FamilyNames:
    return _BUILDERS[family_of(shape).name]()


def names_for_hf_config(config: dict, where: str) -> FamilyNames:
    """The family of a Hugging Face config.json, by its model_type."""
    from conversion.files import ConversionError
    model_type = config.get("model_type")
    for build in _BUILDERS.values():
        names = build()
        if names.hf_model_type == model_type:
            return names
    raise ConversionError(f"{where}: model_type is {model_type!r}; only "
                          f"{' and '.join(repr(b().hf_model_type) for b in _BUILDERS.values())} models convert")
