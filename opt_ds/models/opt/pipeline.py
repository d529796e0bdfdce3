"""OPT's pipeline layer list (the index is the `layer_XX` number of DeepSpeed's checkpoint files):

    0      TiedLayerSpec('embed', OPTTokenEmbedding)            token embedding (owner of the tied weight)
    1      OPTPositions                                          project_in + learned positions
    2..L+1 OPTDecoderLayer x L
    L+2    OPTFinalLayer                                         final LayerNorm / project_out
    L+3    TiedLayerSpec('embed', forward_fn=lm_logits)          tied LM head (no file of its own)

DeepSpeed reduces the tied embedding's gradient across the first and last stage before the data-parallel
reduction, so the copies stay bit-identical.
"""
from __future__ import annotations

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from opt_ds.models.opt.layers import OPTDecoderLayer, OPTFinalLayer, OPTPositions, OPTTokenEmbedding, lm_logits
from opt_ds.models.opt.shape import OPTShape

TIED_EMBEDDING_KEY = "embed"
TIED_WEIGHT = "word_embeddings.weight"
FIRST_DECODER_LAYER = 2


def layer_specs(shape: OPTShape, mp_config, tp_group=None, recompute_attention: bool = False) -> list:
    return [
        TiedLayerSpec(TIED_EMBEDDING_KEY, OPTTokenEmbedding, shape, mp_config, tp_group,
                      tied_weight_attr=[TIED_WEIGHT]),
        LayerSpec(OPTPositions, shape, mp_config, tp_group),
        *[LayerSpec(OPTDecoderLayer, shape, mp_config, tp_group, recompute_attention) for _ in range(shape.num_layers)],
        LayerSpec(OPTFinalLayer, shape, mp_config),
        TiedLayerSpec(TIED_EMBEDDING_KEY, OPTTokenEmbedding, shape, mp_config, tp_group,
                      forward_fn=lm_logits, tied_weight_attr=[TIED_WEIGHT]),
    ]
