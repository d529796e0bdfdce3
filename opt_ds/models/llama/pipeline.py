"""LLaMA's pipeline layer list (the index is the `layer_XX` number of DeepSpeed's checkpoint files):

    0      LlamaTokenEmbedding
    1..L   LlamaDecoderLayer x L
    L+1    LlamaFinalNorm
    L+2    LlamaOutputHead        untied, vocab-parallel
"""
from __future__ import annotations

from deepspeed.pipe import LayerSpec

from opt_ds.models.llama.layers import LlamaDecoderLayer, LlamaFinalNorm, LlamaOutputHead, LlamaTokenEmbedding
from opt_ds.models.llama.shape import LlamaShape


def layer_specs(shape: LlamaShape, mp_config, tp_group=None, recompute_attention: bool = False) -> list:
    return [
        LayerSpec(LlamaTokenEmbedding, shape, mp_config, tp_group),
        *[LayerSpec(LlamaDecoderLayer, shape, mp_config, tp_group, recompute_attention)
          for _ in range(shape.num_layers)],
        LayerSpec(LlamaFinalNorm, shape, mp_config),
        LayerSpec(LlamaOutputHead, shape, mp_config, tp_group),
    ]
