"""Fixtures for the conversion tests, built independently of the code under test.

Tiny random OPT models come from transformers' own OPTForCausalLM (the reference), and the metaseq files
are assembled here by hand from that model's q/k/v, following metaseq's rules (K,V,Q per MP part; FSDP
flat parameters with shard_metadata as fairscale writes them), so a reader that got a rule wrong cannot
agree with them by construction.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

VOCAB = 127            # deliberately not divisible by 2 or 4: exercises vocabulary padding
METASEQ_VOCAB = 128    # metaseq splits the vocabulary evenly over its MP parts
PRE_LN = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
              max_position_embeddings=32)
OPT_350M_STYLE = dict(PRE_LN, word_embed_proj_dim=16, do_layer_norm_before=False)
KINDS = {"pre_ln": PRE_LN, "opt_350m_style": OPT_350M_STYLE}


def tiny_hf_model(kind: str, seed: int = 0, **config):
    """A random OPTForCausalLM with weights large enough that logits and greedy tokens are not trivial."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**KINDS[kind], **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([ids])).logits[0]


def hf_state(model) -> dict:
    """The model's tensors under canonical names (no tied head)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def metaseq_part(model, part: int, parts: int, dtype=None, fp32_norms: bool = False) -> "OrderedDict":
    """MP part `part` of `parts` as metaseq's model-parallel OPT stores it (fused qkv_proj = [K_i; V_i; Q_i]);
    `dtype` casts the tensors, except the LayerNorms with `fp32_norms` (as in some releases, metaseq PR #60)."""
    sd = hf_state(model)
    cfg = model.config
    cut = lambda t, dim=0: torch.chunk(t, parts, dim=dim)[part].clone()  # noqa: E731
    out = OrderedDict()
    out["decoder.version"] = torch.tensor([3.0])
    out["decoder.embed_tokens.weight"] = cut(sd["model.decoder.embed_tokens.weight"])
    out["decoder.embed_positions.weight"] = sd["model.decoder.embed_positions.weight"]
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        out["decoder.project_in_dim.weight"] = sd["model.decoder.project_in.weight"]
        out["decoder.project_out_dim.weight"] = sd["model.decoder.project_out.weight"]
    for i in range(cfg.num_hidden_layers):
        src = lambda n: sd[f"model.decoder.layers.{i}.{n}"]  # noqa: E731
        dst = f"decoder.layers.{i}."
        for w in ("weight", "bias"):
            out[dst + f"self_attn.qkv_proj.{w}"] = torch.cat(
                [cut(src(f"self_attn.{p}_proj.{w}")) for p in ("k", "v", "q")])
        out[dst + "self_attn.out_proj.weight"] = cut(src("self_attn.out_proj.weight"), 1)
        out[dst + "self_attn.out_proj.bias"] = src("self_attn.out_proj.bias")
        for n in ("self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "final_layer_norm.weight",
                  "final_layer_norm.bias", "fc2.bias"):
            out[dst + n] = src(n)
        out[dst + "fc1.weight"], out[dst + "fc1.bias"] = cut(src("fc1.weight")), cut(src("fc1.bias"))
        out[dst + "fc2.weight"] = cut(src("fc2.weight"), 1)
    if cfg.do_layer_norm_before:
        out["decoder.layer_norm.weight"] = sd["model.decoder.final_layer_norm.weight"]
        out["decoder.layer_norm.bias"] = sd["model.decoder.final_layer_norm.bias"]
    if dtype is not None:
        out = OrderedDict((k, v if fp32_norms and "layer_norm" in k else v.to(dtype)) for k, v in out.items())
    return out


def metaseq_file(model_state, model, parts: int) -> dict:
    """A released-style file dict; cfg.model is an argparse.Namespace, as metaseq's tools require."""
    cfg = model.config
    return {"model": model_state, "args": None, "optimizer_history": [], "extra_state": {},
            "cfg": {"model": argparse.Namespace(
                _name="transformer_lm_megatron", decoder_layers=cfg.num_hidden_layers,
                decoder_embed_dim=cfg.hidden_size, decoder_ffn_embed_dim=cfg.ffn_dim,
                decoder_attention_heads=cfg.num_attention_heads, decoder_learned_pos=True,
                decoder_normalize_before=cfg.do_layer_norm_before, max_target_positions=cfg.max_position_embeddings,
                model_parallel_size=parts, share_decoder_input_output_embed=True, activation_fn="relu")}}


def write_metaseq_parts(model, directory: Path, parts: int, dtype=None, fp32_norms: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        torch.save(metaseq_file(metaseq_part(model, k, parts, dtype, fp32_norms), model, parts),
                   directory / f"reshard-model_part-{k}.pt")


def fsdp_shards(state: "OrderedDict", shards: int, groups) -> list:
    """Flatten a state dict the way fairscale's FSDP saves sharded state: one flat tensor per wrapped module
    (`groups`: fsdp_path -> names inside it), padded to a multiple of `shards` and cut into DP shards, plus
    the `shard_metadata` that describes it. Buffers (decoder.version) stay unflattened."""
    param_metadata, flat_pieces = [], {}
    for fsdp_path, names in groups.items():
        full = [f"{fsdp_path}.{n}" if fsdp_path else n for n in names]
        flat = torch.cat([state[k].reshape(-1) for k in full])
        padding = (-flat.numel()) % shards
        flat = torch.cat([flat, flat.new_zeros(padding)])
        key = f"{fsdp_path}.flat_param_0" if fsdp_path else "flat_param_0"
        flat_pieces[key] = list(flat.chunk(shards))
        param_metadata.append({"fsdp_path": fsdp_path, "no_broadcast_optim_state": False, "shared_param_info": [],
                               "params": {"flat_param_0": {"names": list(names),
                                                           "shapes": [state[k].shape for k in full],
                                                           "numels": [state[k].numel() for k in full],
                                                           "padding": 0}}})
    out = []
    for d in range(shards):
        model = {k: v[d].clone() for k, v in flat_pieces.items()}
        model["decoder.version"] = state["decoder.version"]
        meta = {"param_metadata": [dict(e, params={n: dict(i, padding=(padding_of(flat_pieces, e) if d == shards - 1
                                                                     else 0)) for n, i in e["params"].items()})
                                   for e in param_metadata],
                "buffer_names": ["decoder.version"]}
        out.append({"model": model, "shard_metadata": meta})
    return out


def padding_of(flat_pieces: dict, entry: dict) -> int:
    key = f"{entry['fsdp_path']}.flat_param_0" if entry["fsdp_path"] else "flat_param_0"
    total = sum(p.numel() for p in flat_pieces[key])
    return total - sum(entry["params"]["flat_param_0"]["numels"])


def fsdp_groups(state: "OrderedDict") -> dict:
    """metaseq wraps every decoder layer in FSDP; the rest (embeddings, final norm) is the root module."""
    groups = {"": [k for k in state if not k.startswith("decoder.layers.") and k != "decoder.version"]}
    for k in state:
        if k.startswith("decoder.layers."):
            layer = ".".join(k.split(".")[:3])
            groups.setdefault(layer, []).append(k[len(layer) + 1:])
    return groups


def load_tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
