"""The OPT family (arXiv 2205.01068): learned positions, LayerNorm, ReLU MLP, biases, tied LM head."""
from __future__ import annotations

from opt_ds.models.protocol import ModelFamily
from opt_ds.models.opt.shape import POSITION_OFFSET, PRESETS, OPTShape, analytic_parameter_count


class OPTFamily(ModelFamily):
    name = "opt"
    shape_type = OPTShape
    presets = PRESETS
    decoder_layer_name = "OPTDecoderLayer"
    first_decoder_layer = 2
    tied_embedding_key = "embed"

    def layer_specs(self, shape, mp_config, tp_group=None, recompute_attention=False) -> list:
        from opt_ds.models.opt.pipeline import layer_specs
        return layer_specs(shape, mp_config, tp_group, recompute_attention)

    def decoder_layer(self, shape, mp_config, tp_group=None, recompute_attention=False):
        from opt_ds.models.opt.layers import OPTDecoderLayer
        return OPTDecoderLayer(shape, mp_config, tp_group, recompute_attention)

    def analytic_parameter_count(self, shape) -> int:
        return analytic_parameter_count(shape)

    def decoder_shape(self, shape):
        from opt_ds.models.shape import DecoderShape
        return DecoderShape(
            num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_heads=shape.num_heads,
            ffn_hidden_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size,
            relu=True, position_rows=shape.max_position_embeddings + POSITION_OFFSET,
            embed_dim=shape.word_embed_proj_dim, final_norm=shape.has_final_layer_norm)

    def hf_model(self, shape):
        from transformers import OPTConfig, OPTForCausalLM
        config = OPTConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                           num_hidden_layers=shape.num_layers, ffn_dim=shape.ffn_hidden_size,
                           num_attention_heads=shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
                           word_embed_proj_dim=shape.embed_dim, do_layer_norm_before=shape.pre_layer_norm,
                           dropout=shape.dropout, attention_dropout=shape.attention_dropout, activation_dropout=0.0,
                           init_std=shape.init_std, use_cache=False, tie_word_embeddings=True)
        config._attn_implementation = "sdpa"
        return OPTForCausalLM(config)

    def tensor_parallel_divisors(self, shape) -> dict:
        return {"num_heads": shape.num_heads, "ffn_hidden_size": shape.ffn_hidden_size,
                "vocab_size": shape.vocab_size}


FAMILY = OPTFamily()
