"""Test helper: Hugging Face LlamaForCausalLM twins of opt_ds LLaMA shapes, and their weights as the full
(unsharded) tensors of opt_ds's pipeline parameters.

Written independently of conversion/ on purpose: the equivalence tests check the model definition, so
this weight mapping must not share code with the converters it will later be used to check.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opt_ds.models.llama.shape import LlamaShape


def hf_llama_config(shape: LlamaShape) -> LlamaConfig:
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.ffn_hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.kv_heads,
                       max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                       tie_word_embeddings=False, attention_dropout=0.0)


def random_hf_llama(shape: LlamaShape, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(shape)).eval()
    with torch.no_grad():      # RMSNorm weights start at 1: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


def fuse_qkv(q, k, v, num_heads, num_kv_heads):
    """HF's separate q/k/v rows -> opt_ds's rows grouped per kv head: [q of the group; k_g; v_g]."""
    d = q.shape[0] // num_heads
    q = q.reshape(num_kv_heads, num_heads // num_kv_heads * d, -1)
    k, v = k.reshape(num_kv_heads, d, -1), v.reshape(num_kv_heads, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def pipeline_state(hf: LlamaForCausalLM, shape: LlamaShape) -> dict:
    """{PipelineModule parameter name: full tensor} (layer list: embedding 0, layers 1..L, norm, head)."""
    m = hf.model
    state = {"0.embed_tokens.weight": m.embed_tokens.weight,
             f"{shape.num_layers + 1}.norm.weight": m.norm.weight,
             f"{shape.num_layers + 2}.lm_head.weight": hf.lm_head.weight}
    for i, layer in enumerate(m.layers):
        p, a, mlp = f"{i + 1}.", layer.self_attn, layer.mlp
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        state[p + "self_attn.qkv.weight"] = fuse_qkv(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                                     shape.num_heads, shape.kv_heads)
        state[p + "self_attn.o_proj.weight"] = a.o_proj.weight
        state[p + "mlp.gate_up.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        state[p + "mlp.down_proj.weight"] = mlp.down_proj.weight
    return {k: v.detach().clone() for k, v in state.items()}


def load_into(module, full: dict, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy this TP rank's shard of every full tensor into the (stage's) pipeline module: rows/columns as
    megatron marked the parameter (partition_dim), [a_r; b_r] blocks for partition_stride 2."""
    params = dict(module.named_parameters())
    assert set(params) <= set(full), set(params) - set(full)
    with torch.no_grad():
        for name, param in params.items():
            value = full[name]
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                dim, stride = param.partition_dim, param.partition_stride
                blocks = [b.chunk(tp_size, dim=dim)[tp_rank] for b in value.chunk(stride, dim=dim)]
                value = torch.cat(blocks, dim=dim)
            param.copy_(value)
