"""The OPT family (arXiv 2205.01068): learned positions, LayerNorm, ReLU MLP, biases, tied LM head."""
from __future__ import annotations

from opt_ds.models.family import ModelFamily
from opt_ds.models.opt.shape import POSITION_OFFSET, PRESETS, OPTShape, analytic_parameter_count


class OPTFamily(ModelFamily):
    name = "opt"
    shape_type = OPTShape
    presets = PRESETS
    decoder_layer_name = "OPTDecoderLayer"
    first_decoder_layer = 2
    tied_embedding_key = "embed"

    def layer_specs(self, shape, mp_config, tp_group=None) -> list:
        from opt_ds.models.opt.pipeline import layer_specs
        return layer_specs(shape, mp_config, tp_group)

    def decoder_layer(self, shape, mp_config, tp_group=None):
        from opt_ds.models.opt.layers import OPTDecoderLayer
        return OPTDecoderLayer(shape, mp_config, tp_group)

    def analytic_parameter_count(self, shape) -> int:
        return analytic_parameter_count(shape)

    def layer_matmul_parameters(self, shape) -> int:
        h, f = shape.hidden_size, shape.ffn_hidden_size
        return 4 * h * h + 2 * h * f

    def head_matmul_parameters(self, shape) -> int:
        """The tied head's V×E matmul is real work, so it counts; opt-350m adds project_in/out."""
        e, h = shape.embed_dim, shape.hidden_size
        return shape.vocab_size * e + (2 * e * h if shape.has_projections else 0)

    def lookup_parameters(self, shape) -> int:
        """Lookup tables that are not matmuls: the learned positions."""
        return (shape.max_position_embeddings + POSITION_OFFSET) * shape.hidden_size

    def flops_notes(self, shape) -> list:
        notes = []
        if shape.ffn_hidden_size != 4 * shape.hidden_size:
            notes.append(f"F={shape.ffn_hidden_size}≠4h: per-layer term 6·(4h²+2hF)+12·s·h")
        if shape.has_projections:
            notes.append(f"E={shape.embed_dim}≠h: logits 6·V·E plus project_in/out 12·E·h per token")
        return notes

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
