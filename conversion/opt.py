"""OPT in the conversion's canonical form: the tensors of Hugging Face's `OPTForCausalLM` (unsharded,
`model.decoder.*`, no `lm_head`: the head is tied to `embed_tokens`), their shapes, the HF config.json, the
mapping to and from opt_ds's layer states (opt_ds.models.opt: fused QKV per head) and transformers' model of
it. LLaMA's counterpart is conversion.llama; conversion.families gathers both into one table.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from opt_ds.models.presets import BOS_ID, EOS_ID, PAD_ID, POSITION_OFFSET, OPTShape
from opt_ds.models.family import family_of

from conversion.files import ConversionError
from conversion.hf_reference import streamed_hf_model
from conversion.sharding import fuse_qkv_per_head, split_qkv_per_head

PREFIX = "model.decoder."
LAYER_PREFIX = PREFIX + "layers."
EMBED_TOKENS = PREFIX + "embed_tokens.weight"
EMBED_POSITIONS = PREFIX + "embed_positions.weight"
PROJECT_IN = PREFIX + "project_in.weight"
PROJECT_OUT = PREFIX + "project_out.weight"
FINAL_NORM_WEIGHT = PREFIX + "final_layer_norm.weight"
FINAL_NORM_BIAS = PREFIX + "final_layer_norm.bias"
VOCAB_KEYS = (EMBED_TOKENS,)
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# opt_ds pipeline layers (OPT): 0 token embedding, 1 positions (+ project_in), 2..L+1 decoder layers, L+2 final.
EMBEDDING_INDEX, POSITIONS_INDEX = 0, 1
# Decoder-layer tensors that keep their meaning, canonical (HF) name -> opt_ds name. q/k/v fuse into qkv.
DECODER_RENAMES = {
    "self_attn_layer_norm.weight": "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias": "self_attn_layer_norm.bias",
    "self_attn.out_proj.weight": "self_attn.out_proj.weight", "self_attn.out_proj.bias": "self_attn.out_proj.bias",
    "final_layer_norm.weight": "final_layer_norm.weight", "final_layer_norm.bias": "final_layer_norm.bias",
    "fc1.weight": "mlp.fc1.weight", "fc1.bias": "mlp.fc1.bias", "fc2.weight": "mlp.fc2.weight", "fc2.bias": "mlp.fc2.bias",
}
# Global canonical key -> (role of the opt_ds pipeline layer holding it, name inside that layer).
GLOBAL_NAMES = {
    EMBED_TOKENS: ("embedding", "word_embeddings.weight"),
    EMBED_POSITIONS: ("positions", "embed_positions.weight"),
    PROJECT_IN: ("positions", "project_in.weight"),
    FINAL_NORM_WEIGHT: ("final", "final_layer_norm.weight"),
    FINAL_NORM_BIAS: ("final", "final_layer_norm.bias"),
    PROJECT_OUT: ("final", "project_out.weight"),
}
# The sizes an OPT config.json must give, and what each is (for the error messages).
SIZE_KEYS = {"num_hidden_layers": "the number of decoder layers", "hidden_size": "the model width",
             "num_attention_heads": "the attention heads per layer", "ffn_dim": "the MLP width",
             "vocab_size": "the vocabulary size", "max_position_embeddings": "the longest sequence"}


def layer_shapes(shape: OPTShape) -> Dict[str, tuple]:
    """Shapes of one decoder layer's tensors, by name inside the layer."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    shapes = {f"self_attn.{p}.weight": (h, h) for p in (*ATTENTION_INPUTS, "out_proj")}
    shapes.update({f"self_attn.{p}.bias": (h,) for p in (*ATTENTION_INPUTS, "out_proj")})
    shapes.update({"self_attn_layer_norm.weight": (h,), "self_attn_layer_norm.bias": (h,),
                   "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
                   "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,)})
    return shapes


def global_shapes(shape: OPTShape) -> Dict[str, tuple]:
    """Shapes of the tensors outside the decoder layers (embeddings, projections, final LayerNorm)."""
    h, e = shape.hidden_size, shape.embed_dim
    shapes = {EMBED_TOKENS: (shape.vocab_size, e),
              EMBED_POSITIONS: (shape.max_position_embeddings + POSITION_OFFSET, h)}
    if shape.has_projections:
        shapes[PROJECT_IN] = (h, e)
        shapes[PROJECT_OUT] = (e, h)
    if shape.has_final_layer_norm:
        shapes[FINAL_NORM_WEIGHT] = (h,)
        shapes[FINAL_NORM_BIAS] = (h,)
    return shapes


def describe_shape(shape: OPTShape) -> str:
    text = (f"{shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads, "
            f"ffn {shape.ffn_hidden_size}, vocab {shape.vocab_size}, positions {shape.max_position_embeddings}")
    if shape.has_projections:
        text += f", word_embed_proj_dim {shape.embed_dim}"
    return text + (", pre-LN" if shape.pre_layer_norm else ", post-LN")


def layer_roles(shape: OPTShape) -> Dict[str, int]:
    return {"embedding": EMBEDDING_INDEX, "positions": POSITIONS_INDEX, "final": family_of(shape).final_layer_index(shape)}


# --- Hugging Face config.json ---------------------------------------------------------------------------

def shape_from_config(config: dict, where: str) -> OPTShape:
    unsupported = [(k, v, want) for k, want in (("activation_function", "relu"), ("enable_bias", True),
                                                 ("layer_norm_elementwise_affine", True))
                   if (v := config.get(k, want)) != want]
    if config.get("do_layer_norm_before", True) and config.get("_remove_final_layer_norm", False):
        unsupported.append(("_remove_final_layer_norm", True, False))
    if unsupported:
        raise ConversionError(f"{where}: {', '.join(f'{k}={v!r}' for k, v, _ in unsupported)} is not an OPT variant "
                              f"opt_ds implements (it needs {', '.join(f'{k}={w!r}' for k, _, w in unsupported)})")
    sizes = {key: config.get(key, config.get("d_model") if key == "hidden_size" else None) for key in SIZE_KEYS}
    for key, value in sizes.items():
        if key not in config and value is None:
            raise ConversionError(f"{where}: config.json lacks {key!r} ({SIZE_KEYS[key]}); it is not a complete OPT "
                                  "config: add it, or fetch config.json again from the model's source")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{where}: config.json has {key}={value!r}, but {SIZE_KEYS[key]} must be a positive "
                                  "integer: correct it, or fetch config.json again from the model's source")
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if hidden % heads:
        raise ConversionError(f"{where}: config.json has hidden_size={hidden}, not divisible by "
                              f"num_attention_heads={heads}; correct one of them")
    proj = config.get("word_embed_proj_dim") or hidden
    return OPTShape(num_layers=sizes["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
                    ffn_hidden_size=sizes["ffn_dim"], vocab_size=sizes["vocab_size"],
                    max_position_embeddings=sizes["max_position_embeddings"],
                    word_embed_proj_dim=proj if proj != hidden else None,
                    pre_layer_norm=config.get("do_layer_norm_before", True),
                    dropout=config.get("dropout", 0.1), attention_dropout=config.get("attention_dropout", 0.0),
                    init_std=config.get("init_std", 0.02))


def config_from_shape(shape: OPTShape, dtype: torch.dtype) -> dict:
    """config.json as transformers' OPTConfig writes it (readable by transformers 4.x and 5.x)."""
    return {
        "_remove_final_layer_norm": False, "activation_function": "relu", "architectures": ["OPTForCausalLM"],
        "attention_dropout": shape.attention_dropout, "bos_token_id": BOS_ID, "do_layer_norm_before": shape.pre_layer_norm,
        "dropout": shape.dropout, "enable_bias": True, "eos_token_id": EOS_ID, "ffn_dim": shape.ffn_hidden_size,
        "hidden_size": shape.hidden_size, "init_std": shape.init_std, "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0, "max_position_embeddings": shape.max_position_embeddings, "model_type": "opt",
        "num_attention_heads": shape.num_heads, "num_hidden_layers": shape.num_layers, "pad_token_id": PAD_ID,
        "prefix": "</s>", "tie_word_embeddings": True, "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True, "vocab_size": shape.vocab_size, "word_embed_proj_dim": shape.embed_dim,
    }


def hf_reference(ckpt) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """OPTForCausalLM holding `ckpt` (fp32, streamed layer by layer), or None when transformers is not installed."""
    try:
        from transformers import OPTConfig, OPTForCausalLM
    except ImportError:
        return None
    config = OPTConfig.from_dict({**config_from_shape(ckpt.shape, torch.float32), "dropout": 0.0,
                                  "attention_dropout": 0.0})
    return streamed_hf_model(OPTForCausalLM, config, ckpt, LAYER_PREFIX, tied_embedding=EMBED_TOKENS)


# --- canonical <-> opt_ds layer states (full tensors, before TP cutting) -------------------------------

def decoder_to_opt_ds(layer: Dict[str, torch.Tensor], shape: OPTShape) -> Dict[str, torch.Tensor]:
    """A canonical decoder layer as opt_ds's OPTDecoderLayer.state_dict() at TP=1, in module order."""
    attention = {f"self_attn.qkv.{w}": fuse_qkv_per_head(*(layer[f"self_attn.{p}.{w}"] for p in ATTENTION_INPUTS),
                                                          shape.num_heads) for w in ("weight", "bias")}
    renamed = {ours: layer[theirs] for theirs, ours in DECODER_RENAMES.items()}
    order = ["self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "self_attn.qkv.weight", "self_attn.qkv.bias",
             "self_attn.out_proj.weight", "self_attn.out_proj.bias", "final_layer_norm.weight",
             "final_layer_norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    merged = {**attention, **renamed}
    return {name: merged[name] for name in order}


def decoder_from_opt_ds(state: Dict[str, torch.Tensor], shape: OPTShape) -> Dict[str, torch.Tensor]:
    layer = {theirs: state[ours] for theirs, ours in DECODER_RENAMES.items() if ours in state}
    for w in ("weight", "bias"):
        fused = state.get(f"self_attn.qkv.{w}")
        if fused is not None:
            q, k, v = split_qkv_per_head(fused, shape.num_heads)
            layer.update({f"self_attn.q_proj.{w}": q, f"self_attn.k_proj.{w}": k, f"self_attn.v_proj.{w}": v})
    return layer
