"""metaseq files: what the writer produces is what metaseq's tools expect; every released layout reads back.

Two checks run metaseq's and transformers' own scripts on files written here. They need code this
project does not ship, so they run only when pointed at it (see docs/conversion.md):
  OPT_DS_TOOLS_PYTHONPATH=/path/to/site-dir      transformers 4.x (its OPT converter) and `fire`
  OPT_DS_METASEQ_SRC=/path/to/metaseq-checkout    metaseq/scripts/reshard_mp.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from conversion.convert import Options, convert, open_checkpoint
from conversion.files import ConversionError
from conversion.metaseq import ReplicaMismatchWarning
from conversion_helpers import (METASEQ_VOCAB, assert_same_tensors, fsdp_groups, fsdp_shards, hf_state,
                                metaseq_file, metaseq_part, tiny_hf_model, write_metaseq_parts)


def write(model, tmp_path, name="ms", **options):
    model.save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", tmp_path / name, Options(to="metaseq", verify=False, **options),
                   out=lambda _: None) == 0
    return tmp_path / name


@pytest.mark.parametrize("kind", ["pre_ln", "opt_350m_style"])
def test_parts_have_metaseq_keys_kvq_order_and_release_dtypes(tmp_path, kind):
    model = tiny_hf_model(kind, vocab_size=METASEQ_VOCAB)
    out = write(model, tmp_path, tp=2, dtype="fp16")
    assert sorted(p.name for p in out.iterdir()) == ["reshard-model_part-0.pt", "reshard-model_part-1.pt"]
    for k in range(2):
        ckpt = torch.load(out / f"reshard-model_part-{k}.pt", weights_only=False)
        cfg = ckpt["cfg"]["model"]
        assert isinstance(cfg, argparse.Namespace)
        assert (cfg.model_parallel_size, cfg.decoder_layers, cfg.decoder_attention_heads) == (2, 4, 4)
        assert cfg.decoder_normalize_before is (kind == "pre_ln")
        # built by hand from transformers' q, k, v in metaseq's [K_i; V_i; Q_i] order
        expected = metaseq_part(model, k, 2, dtype=torch.float16)
        assert_same_tensors(dict(expected), dict(ckpt["model"]))
        assert "decoder.output_projection.weight" not in ckpt["model"]
        assert ckpt["model"]["decoder.version"].tolist() == [3.0]
        assert ("decoder.layer_norm.weight" in ckpt["model"]) is (kind == "pre_ln")
        assert ("decoder.project_in_dim.weight" in ckpt["model"]) is (kind != "pre_ln")
        # what metaseq's load_checkpoint_to_cpu / _upgrade_state_dict read
        assert {"lr_scheduler_state", "num_updates"} <= set(ckpt["optimizer_history"][-1])
        assert "train_iterator" in ckpt["extra_state"]


def test_restored_singleton_has_separate_qkv(tmp_path):
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    out = write(model, tmp_path, metaseq_layout="restored")
    ckpt = torch.load(out / "restored.pt", weights_only=False)
    sd = hf_state(model)
    for p in ("q", "k", "v"):
        assert torch.equal(ckpt["model"][f"decoder.layers.1.self_attn.{p}_proj.weight"],
                           sd[f"model.decoder.layers.1.self_attn.{p}_proj.weight"])
    assert not any("qkv_proj" in key for key in ckpt["model"])
    assert ckpt["cfg"]["model"].model_parallel_size == 1


def test_fsdp_flattened_training_shards_unflatten(tmp_path):
    """checkpoint_last-model_part-K-shardD.pt: per MP part, flat parameters cut over DP shards (padded),
    with shard_metadata and the tied output projection recorded as a shared parameter."""
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    for k in range(2):
        state = metaseq_part(model, k, 2)
        shards = fsdp_shards(state, 3, fsdp_groups(state))
        shards[0]["shard_metadata"]["param_metadata"][0]["shared_param_info"] = [
            ("decoder.embed_tokens.weight", "decoder.output_projection.weight")]
        for d, shard in enumerate(shards):
            file = metaseq_file(shard["model"], model, 2)
            file["shard_metadata"] = shard["shard_metadata"]
            torch.save(file, tmp_path / f"checkpoint_last-model_part-{k}-shard{d}.pt")
    assert any(p["params"]["flat_param_0"]["padding"] for p in shards[-1]["shard_metadata"]["param_metadata"])
    ckpt = open_checkpoint(tmp_path / "checkpoint_last-model_part-1-shard2.pt", "metaseq")
    assert_same_tensors(hf_state(model), ckpt.state_dict())


def test_missing_fsdp_shard_is_an_error(tmp_path):
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    state = metaseq_part(model, 0, 1)
    for d, shard in enumerate(fsdp_shards(state, 2, fsdp_groups(state))):
        file = metaseq_file(shard["model"], model, 1)
        file["shard_metadata"] = shard["shard_metadata"]
        if d == 0:
            torch.save(file, tmp_path / f"checkpoint_last-model_part-0-shard{d}.pt")
    with pytest.raises(ConversionError, match="a -shardD file is missing"):
        open_checkpoint(tmp_path, "metaseq").state_dict()


def test_tied_output_projection_is_accepted_when_equal_to_the_embedding(tmp_path):
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    state = metaseq_part(model, 0, 1)
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    torch.save(metaseq_file(state, model, 1), tmp_path / "restored.pt")
    assert_same_tensors(hf_state(model), open_checkpoint(tmp_path / "restored.pt", "metaseq").state_dict())


def test_replicated_tensors_that_differ_between_parts_warn_and_use_part_0(tmp_path):
    """metaseq's reshard_mp only warns about this (it tolerates drift between MP copies); so does the reader."""
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    write_metaseq_parts(model, tmp_path, parts=2)
    path = tmp_path / "reshard-model_part-1.pt"
    part = torch.load(path, weights_only=False)
    part["model"]["decoder.layers.0.final_layer_norm.bias"] += 1e-3
    torch.save(part, path)
    with pytest.warns(ReplicaMismatchWarning, match="final_layer_norm.bias differs between MP part 0 and part 1"):
        state = open_checkpoint(tmp_path, "metaseq").state_dict()
    assert_same_tensors(hf_state(model), state)


# --- metaseq's and transformers' own tools on files written here (opt-in) -----------------------------

METASEQ_SRC = os.environ.get("OPT_DS_METASEQ_SRC")
TOOLS = os.environ.get("OPT_DS_TOOLS_PYTHONPATH")


def external(args):
    """Run a third-party script. Both load metaseq pickles with plain torch.load, which torch >= 2.6 restricts
    to weights_only (refusing cfg's argparse.Namespace, in released files as in these); the environment
    variable restores the old default for them."""
    env = dict(os.environ, PYTHONPATH=TOOLS, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    subprocess.run([sys.executable, *map(str, args)], check=True, env=env, timeout=300,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not (METASEQ_SRC and TOOLS), reason="set OPT_DS_METASEQ_SRC and OPT_DS_TOOLS_PYTHONPATH")
@pytest.mark.parametrize("new_parts", [1, 4])
def test_metaseq_reshard_mp_accepts_written_parts(tmp_path, new_parts):
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    out = write(model, tmp_path, tp=2, dtype="fp16")
    script = os.path.join(METASEQ_SRC, "metaseq", "scripts", "reshard_mp.py")
    external([script, "--input", out / "reshard-model_part-*.pt", "--output",
              tmp_path / "resharded" / "reshard-model_part-{i}.pt", "--num-output-parts", new_parts])
    resharded = open_checkpoint(tmp_path / "resharded", "metaseq")
    assert_same_tensors({k: v.half() for k, v in hf_state(model).items()}, resharded.state_dict())


@pytest.mark.skipif(not TOOLS, reason="set OPT_DS_TOOLS_PYTHONPATH to a site dir holding transformers 4.x")
@pytest.mark.parametrize("layout", ["parts", "restored"])
@pytest.mark.parametrize("kind", ["pre_ln", "opt_350m_style"])
def test_transformers4_converter_accepts_written_file(tmp_path, layout, kind):
    model = tiny_hf_model(kind, vocab_size=METASEQ_VOCAB)
    out = write(model, tmp_path, metaseq_layout=layout)
    name = "restored.pt" if layout == "restored" else "reshard-model_part-0.pt"
    external(["-m", "transformers.models.opt.convert_opt_original_pytorch_checkpoint_to_pytorch",
              "--fairseq_path", out / name, "--pytorch_dump_folder_path", tmp_path / "converted",
              "--hf_config", tmp_path / "hf"])
    converted = open_checkpoint(tmp_path / "converted", "hf")       # an OPTModel save: keys lack `model.`
    assert_same_tensors({k: v.half() for k, v in hf_state(model).items()}, converted.state_dict())
