"""The model-family protocol: what one decoder architecture provides to the rest of opt_ds (see
opt_ds.models.family, which registers the families). It imports no family, so family packages can import it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict


# DeepSpeed matches `type:` against layer class names as a regex; every family's decoder layer class name ends in
# DecoderLayer (OPTDecoderLayer, LlamaDecoderLayer), so this balances pipeline stages by decoder layers.
DECODER_PARTITION_METHOD = "type:DecoderLayer"


@dataclass(frozen=True)
class Preset:
    """A named model size: its architecture. The recipe its paper trained it with (batch, learning rate,
    schedule, layout) is its run config, ds_configs/<name>.yaml (opt_ds.config.shipped)."""
    name: str
    shape: Any


class ModelFamily:
    """What one decoder architecture provides to the rest of opt_ds (see the module docstring)."""
    name: str
    shape_type: type
    presets: Dict[str, Preset]
    decoder_layer_name: str         # class name: DeepSpeed's `type:` partitioning and activation checkpointing
    first_decoder_layer: int        # index of decoder layer 0 in the pipeline layer list
    tied_embedding_key: str = ""    # DeepSpeed TiedLayerSpec key, "" when the head is untied

    def layer_specs(self, shape, mp_config, tp_group=None, recompute_attention=False) -> list:
        """DeepSpeed LayerSpecs of the whole model. Decoder layers take and return [seq, batch, hidden]
        (opt_ds.models.sequence); `recompute_attention`: selective recompute (opt_ds.models.attention)."""
        raise NotImplementedError

    def decoder_layer(self, shape, mp_config, tp_group=None, recompute_attention=False):
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
