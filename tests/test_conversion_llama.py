"""LLaMA conversion: a Hugging Face LlamaForCausalLM directory (GQA; safetensors or sharded .bin) -> opt_ds at
TP=2 x PP=2 -> Hugging Face is bit-exact, every conversion passes its self-check (logits, KL, greedy, and
transformers' LlamaForCausalLM as reference), and configs opt_ds does not implement are refused."""
import json

import pytest
import torch

from conversion.convert import Options, convert, open_checkpoint
from conversion.files import ConversionError
from hf_llama_reference import random_hf_llama
from opt_ds.models.llama.shape import LlamaShape

SHAPE = LlamaShape(num_layers=4, hidden_size=64, num_heads=8, ffn_hidden_size=176, vocab_size=250,
                   max_position_embeddings=64, num_kv_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5)


def run_convert(src, dst, **options):
    lines = []
    code = convert(src, dst, Options(**options), out=lines.append)
    return code, "\n".join(lines)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    random_hf_llama(SHAPE).save_pretrained(path)
    return path


def test_hf_to_opt_ds_tp2_pp2_and_back_is_bit_exact(hf_dir, tmp_path):
    code, out = run_convert(hf_dir, tmp_path / "ods", to="opt_ds", tp=2, pp=2)
    assert code == 0, out
    assert "verify: OK" in out and "target in transformers' LlamaForCausalLM vs opt_ds" in out
    assert sorted(p.name for p in (tmp_path / "ods" / "global_step0").glob("layer_*"))[-1] == \
        "layer_06-model_01-model_states.pt"     # embedding, 4 layers, norm, head; 2 TP ranks (250 rows padded)
    code, out = run_convert(tmp_path / "ods", tmp_path / "back", to="hf")
    assert code == 0, out
    original, back = open_checkpoint(hf_dir, "hf").state_dict(), open_checkpoint(tmp_path / "back", "hf").state_dict()
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 2, False)


def test_sharded_bin_reads_like_safetensors(hf_dir, tmp_path):
    state = open_checkpoint(hf_dir, "hf").state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    (tmp_path / "bin").mkdir()
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / "bin" / name)
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    (tmp_path / "bin" / "config.json").write_text((hf_dir / "config.json").read_text())
    code, out = run_convert(tmp_path / "bin", tmp_path / "ods", to="opt_ds", tp=2)
    assert code == 0 and "verify: OK" in out, out


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope_type='llama3'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
])
def test_unimplemented_config_options_are_refused(hf_dir, tmp_path, change, named):
    src = tmp_path / "src"
    src.mkdir()
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    with pytest.raises(ConversionError, match=f"{named}.* is not implemented by opt_ds's LLaMA.*refusing"):
        run_convert(src, tmp_path / "out", to="opt_ds")
    assert not (tmp_path / "out").exists()


def test_tensor_parallel_degree_must_divide_the_key_value_heads(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match="--tp 4 does not divide num_kv_heads 2; use one of 1, 2"):
        run_convert(hf_dir, tmp_path / "out", to="opt_ds", tp=4)
    assert not (tmp_path / "out").exists()
