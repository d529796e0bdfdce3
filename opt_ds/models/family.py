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

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict


# DeepSpeed matches `type:` against layer class names as a regex; every family's decoder layer class name ends in
# DecoderLayer (OPTDecoderLayer, LlamaDecoderLayer), so this balances pipeline stages by decoder layers.
DECODER_PARTITION_METHOD = "type:DecoderLayer"


@dataclass(frozen=True)
class Preset:
    """A named model size with the hyper-parameters its paper trained it with (batch in tokens)."""
    name: str
    shape: Any
    global_batch_tokens: int
    peak_lr: float
    tensor_parallel: int            # the TP degree its run YAML uses


class ModelFamily:
    """What one decoder architecture provides to the rest of opt_ds (see the module docstring)."""
    name: str
    shape_type: type
    presets: Dict[str, Preset]
    decoder_layer_name: str         # class name: DeepSpeed's `type:` partitioning and activation checkpointing
    first_decoder_layer: int        # index of decoder layer 0 in the pipeline layer list
    tied_embedding_key: str = ""    # DeepSpeed TiedLayerSpec key, "" when the head is untied

    def layer_specs(self, shape, mp_config, tp_group=None) -> list:
        raise NotImplementedError

    def decoder_layer(self, shape, mp_config, tp_group=None):
        raise NotImplementedError

    def analytic_parameter_count(self, shape) -> int:
        raise NotImplementedError

    def decoder_shape(self, shape):
        """The shape in general terms (`opt_ds.models.shape.DecoderShape`): what the FLOPs conventions, the
        projection and the planner count."""
        raise NotImplementedError

    def tensor_parallel_divisors(self, shape) -> Dict[str, int]:
        """`model.<field>` values that the tensor-parallel degree must divide."""
        raise NotImplementedError

    def hf_model(self, shape):
        """Hugging Face's model of this architecture on `shape` (the bench peer); needs transformers."""
        raise NotImplementedError

    def final_layer_index(self, shape) -> int:
        return self.first_decoder_layer + shape.num_layers

    def decoder_layer_index(self, layer: int) -> int:
        return self.first_decoder_layer + layer

    def shape_fields(self) -> set:
        return {f.name for f in dataclasses.fields(self.shape_type)}


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
