"""Test helper: copy a Hugging Face OPTForCausalLM's weights into a one-process opt_ds pipeline model.

Written independently of conversion/ on purpose: the equivalence test checks the model definition, so its
weight mapping must not share code with the converters it will later be used to check.
"""
import torch
from transformers import OPTConfig, OPTForCausalLM

from opt_ds.models.presets import OPTShape


def hf_config(shape: OPTShape) -> OPTConfig:
    return OPTConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                     ffn_dim=shape.ffn_hidden_size, num_attention_heads=shape.num_heads,
                     max_position_embeddings=shape.max_position_embeddings, word_embed_proj_dim=shape.embed_dim,
                     do_layer_norm_before=shape.pre_layer_norm, dropout=0.0, attention_dropout=0.0,
                     activation_function="relu", enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def random_hf_model(shape: OPTShape, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    model = OPTForCausalLM(hf_config(shape)).eval()
    with torch.no_grad():      # HF zero-inits biases and sets LayerNorms to 1/0: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


def fuse_qkv(q, k, v, num_heads):
    """HF's separate q/k/v rows -> opt_ds's per-head [q_h; k_h; v_h] fused rows."""
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(num_heads, -1, *rest) for t in (q, k, v)], dim=1)
    return stacked.reshape(-1, *rest)


def copy_hf_into_pipeline(hf: OPTForCausalLM, module, shape: OPTShape) -> None:
    d = hf.model.decoder
    targets = {"tied_modules.embed.word_embeddings.weight": d.embed_tokens.weight,
               "1.embed_positions.weight": d.embed_positions.weight}
    if shape.has_projections:
        targets["1.project_in.weight"] = d.project_in.weight
        targets[f"{shape.num_layers + 2}.project_out.weight"] = d.project_out.weight
    if shape.has_final_layer_norm:
        for p in ("weight", "bias"):
            targets[f"{shape.num_layers + 2}.final_layer_norm.{p}"] = getattr(d.final_layer_norm, p)
    for i, layer in enumerate(d.layers):
        prefix = f"{i + 2}."
        a = layer.self_attn
        for p in ("weight", "bias"):
            targets[prefix + f"self_attn_layer_norm.{p}"] = getattr(layer.self_attn_layer_norm, p)
            targets[prefix + f"final_layer_norm.{p}"] = getattr(layer.final_layer_norm, p)
            targets[prefix + f"self_attn.qkv.{p}"] = fuse_qkv(getattr(a.q_proj, p), getattr(a.k_proj, p),
                                                               getattr(a.v_proj, p), shape.num_heads)
            targets[prefix + f"self_attn.out_proj.{p}"] = getattr(a.out_proj, p)
            targets[prefix + f"mlp.fc1.{p}"] = getattr(layer.fc1, p)
            targets[prefix + f"mlp.fc2.{p}"] = getattr(layer.fc2, p)
    params = dict(module.named_parameters())
    assert set(params) == set(targets), set(params) ^ set(targets)
    with torch.no_grad():
        for name, value in targets.items():
            params[name].copy_(value)
