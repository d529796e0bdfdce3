"""The LLaMA family (arXiv 2302.13971, 2307.09288): RMSNorm pre-norm, SwiGLU, rotary positions, GQA, no
biases, untied output head."""
from __future__ import annotations

from opt_ds.models.protocol import ModelFamily
from opt_ds.models.llama.shape import PRESETS, LlamaShape, analytic_parameter_count


class LlamaFamily(ModelFamily):
    name = "llama"
    shape_type = LlamaShape
    presets = PRESETS
    decoder_layer_name = "LlamaDecoderLayer"
    first_decoder_layer = 1
    tied_embedding_key = ""

    def layer_specs(self, shape, mp_config, tp_group=None, recompute_attention=False) -> list:
        from opt_ds.models.llama.pipeline import layer_specs
        return layer_specs(shape, mp_config, tp_group, recompute_attention)

    def decoder_layer(self, shape, mp_config, tp_group=None, recompute_attention=False):
        from opt_ds.models.llama.layers import LlamaDecoderLayer
        return LlamaDecoderLayer(shape, mp_config, tp_group, recompute_attention)

    def analytic_parameter_count(self, shape) -> int:
        return analytic_parameter_count(shape)

    def decoder_shape(self, shape):
        from opt_ds.models.shape import DecoderShape
        return DecoderShape(
            num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_heads=shape.num_heads,
            ffn_hidden_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size, num_kv_heads=shape.num_kv_heads,
            gated_mlp=True, tied_head=False, bias=False, rms_norm=True)

    def hf_model(self, shape):
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                             intermediate_size=shape.ffn_hidden_size, num_hidden_layers=shape.num_layers,
                             num_attention_heads=shape.num_heads, num_key_value_heads=shape.kv_heads,
                             max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
                             rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                             initializer_range=shape.init_std, attention_dropout=shape.attention_dropout,
                             tie_word_embeddings=False, use_cache=False)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    def tensor_parallel_divisors(self, shape) -> dict:
        return {"num_heads": shape.num_heads, "num_kv_heads": shape.kv_heads,
                "ffn_hidden_size": shape.ffn_hidden_size, "vocab_size": shape.vocab_size}


FAMILY = LlamaFamily()
