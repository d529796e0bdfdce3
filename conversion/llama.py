"""LLaMA in the conversion's canonical form: the tensors of Hugging Face's `LlamaForCausalLM` (unsharded,
`model.layers.N.*`, untied `lm_head.weight`), their shapes, the HF config.json, and the mapping to and from
opt_ds's layer states (opt_ds.models.llama: fused QKV grouped per key/value head, fused [gate; up]).
"""
from __future__ import annotations

from typing import Dict

import torch

from opt_ds.models.llama.shape import LlamaShape

from conversion.files import ConversionError
from conversion.hf_reference import LM_HEAD, streamed_hf_model

PREFIX = "model."
LAYER_PREFIX = PREFIX + "layers."
EMBED_TOKENS = PREFIX + "embed_tokens.weight"
FINAL_NORM = PREFIX + "norm.weight"
VOCAB_KEYS = (EMBED_TOKENS, LM_HEAD)
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
# Global canonical key -> (role of the opt_ds pipeline layer holding it, name inside that layer).
GLOBAL_NAMES = {EMBED_TOKENS: ("embedding", "embed_tokens.weight"), FINAL_NORM: ("final", "norm.weight"),
                LM_HEAD: ("head", "lm_head.weight")}
DECODER_RENAMES = {"input_layernorm.weight": "input_layernorm.weight",
                   "post_attention_layernorm.weight": "post_attention_layernorm.weight",
                   "self_attn.o_proj.weight": "self_attn.o_proj.weight", "mlp.down_proj.weight": "mlp.down_proj.weight"}
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2}     # LLaMA's SentencePiece <s>, </s>
# config.json keys opt_ds's LLaMA does not implement, with the value that means "not used".
UNIMPLEMENTED = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                 "hidden_act": "silu", "pretraining_tp": 1}


def layer_shapes(shape: LlamaShape) -> Dict[str, tuple]:
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    kv = shape.kv_heads * d
    return {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (shape.num_heads * d, h),
            "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, shape.num_heads * d), "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}


def global_shapes(shape: LlamaShape) -> Dict[str, tuple]:
    return {EMBED_TOKENS: (shape.vocab_size, shape.hidden_size), FINAL_NORM: (shape.hidden_size,),
            LM_HEAD: (shape.vocab_size, shape.hidden_size)}


def describe_shape(shape: LlamaShape) -> str:
    return (f"LLaMA, {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads "
            f"({shape.kv_heads} key/value), ffn {shape.ffn_hidden_size}, vocab {shape.vocab_size}, positions "
            f"{shape.max_position_embeddings}, rope_theta {shape.rope_theta:g}")


def layer_roles(shape: LlamaShape) -> Dict[str, int]:
    return {"embedding": 0, "final": shape.num_layers + 1, "head": shape.num_layers + 2}


# --- Hugging Face config.json ---------------------------------------------------------------------------

def shape_from_config(config: dict, where: str) -> LlamaShape:
    used = [f"{k}={config[k]!r}" for k, off in UNIMPLEMENTED.items() if config.get(k, off) not in (off, None)
            and not (k == "pretraining_tp" and config[k] == 1)]
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        used.append(f"rope_parameters.rope_type={rope['rope_type']!r}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config.get("num_attention_heads", 0) != config.get("hidden_size"):
        used.append(f"head_dim={head_dim!r}")
    if used:
        raise ConversionError(f"{where}: {', '.join(used)} is not implemented by opt_ds's LLaMA (it implements "
                              "default RoPE, no biases, SiLU, an untied head); refusing rather than ignoring it")
    try:
        return LlamaShape(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                          num_heads=config["num_attention_heads"], ffn_hidden_size=config["intermediate_size"],
                          vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
                          num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                          rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                          rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                          init_std=config.get("initializer_range", 0.02))
    except KeyError as err:
        raise ConversionError(f"{where}: config.json lacks {err.args[0]!r}; it is not a complete LLaMA "
                              "config") from None
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None


def config_from_shape(shape: LlamaShape, dtype: torch.dtype) -> dict:
    """config.json as transformers' LlamaConfig writes it."""
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": shape.attention_dropout, "hidden_act": "silu", "hidden_size": shape.hidden_size,
            "initializer_range": shape.init_std, "intermediate_size": shape.ffn_hidden_size,
            "max_position_embeddings": shape.max_position_embeddings, "mlp_bias": False,
            "num_attention_heads": shape.num_heads, "num_hidden_layers": shape.num_layers,
            "num_key_value_heads": shape.kv_heads, "pretraining_tp": 1, "rms_norm_eps": shape.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta}, "rope_scaling": None,
            "rope_theta": shape.rope_theta, "tie_word_embeddings": False, "torch_dtype": dtype_name,
            "use_cache": True, "vocab_size": shape.vocab_size, **SPECIAL_IDS}


def hf_reference(ckpt):
    """transformers' LlamaForCausalLM holding `ckpt` (fp32, streamed layer by layer), as forward(ids) -> logits;
    None without it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig.from_dict({**config_from_shape(ckpt.shape, torch.float32), "attention_dropout": 0.0})
    return streamed_hf_model(LlamaForCausalLM, config, ckpt, LAYER_PREFIX, on_cpu=("model.rotary_emb",))


# --- canonical <-> opt_ds layer states --------------------------------------------------------------------

def decoder_to_opt_ds(layer: Dict[str, torch.Tensor], shape: LlamaShape) -> Dict[str, torch.Tensor]:
    """A canonical decoder layer as LlamaDecoderLayer.state_dict() at TP=1, in module order."""
    q, k, v = (layer[f"self_attn.{p}.weight"] for p in ATTENTION_INPUTS)
    kv, d, h = shape.kv_heads, shape.head_dim, shape.hidden_size
    qkv = torch.cat([q.reshape(kv, -1, h), k.reshape(kv, d, h), v.reshape(kv, d, h)], dim=1).reshape(-1, h)
    return {"input_layernorm.weight": layer["input_layernorm.weight"], "self_attn.qkv.weight": qkv,
            "self_attn.o_proj.weight": layer["self_attn.o_proj.weight"],
            "post_attention_layernorm.weight": layer["post_attention_layernorm.weight"],
            "mlp.gate_up.weight": torch.cat([layer["mlp.gate_proj.weight"], layer["mlp.up_proj.weight"]]),
            "mlp.down_proj.weight": layer["mlp.down_proj.weight"]}


def decoder_from_opt_ds(state: Dict[str, torch.Tensor], shape: LlamaShape) -> Dict[str, torch.Tensor]:
    layer = {theirs: state[ours] for theirs, ours in DECODER_RENAMES.items() if ours in state}
    if "self_attn.qkv.weight" in state:
        qkv = state["self_attn.qkv.weight"]
        kv, d, group = shape.kv_heads, shape.head_dim, shape.num_heads // shape.kv_heads
        grouped = qkv.reshape(kv, group + 2, d, -1)
        layer["self_attn.q_proj.weight"] = grouped[:, :group].reshape(-1, qkv.shape[-1]).clone()
        layer["self_attn.k_proj.weight"] = grouped[:, group].reshape(-1, qkv.shape[-1]).clone()
        layer["self_attn.v_proj.weight"] = grouped[:, group + 1].reshape(-1, qkv.shape[-1]).clone()
    if "mlp.gate_up.weight" in state:
        gate, up = state["mlp.gate_up.weight"].chunk(2, dim=0)
        layer["mlp.gate_proj.weight"], layer["mlp.up_proj.weight"] = gate.clone(), up.clone()
    return layer
