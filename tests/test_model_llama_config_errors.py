"""Impossible LLaMA configs fail at config load, before any process group exists, with one line naming the
key and the fix; so do settings of one family given to the other."""
import pytest

from conftest import TINY_MODEL
from opt_ds.config import ConfigError, load_config

LLAMA = TINY_MODEL + ["model.family=llama", "batch.global_batch_size=8", "batch.micro_batch_size=2"]


def error(overrides, world_size=None):
    with pytest.raises(ConfigError) as info:
        load_config(None, LLAMA + overrides, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_kv_heads_not_divisible_by_tensor_parallel():
    msg = error(["model.num_kv_heads=2", "parallel.tensor=4"], world_size=4)
    assert "model.num_kv_heads 2 is not divisible by parallel.tensor 4" in msg


def test_heads_not_divisible_by_kv_heads():
    msg = error(["model.num_kv_heads=3"])
    assert "num_heads 4 is not divisible by num_kv_heads 3" in msg and "choose num_kv_heads from 1, 2, 4" in msg


def test_odd_head_dim_for_rotary_embeddings():
    msg = error(["model.hidden_size=60"])
    assert "head dim 15" in msg and "odd" in msg and "rotary" in msg


def test_llama_setting_in_an_opt_config():
    with pytest.raises(ConfigError, match="model.num_kv_heads is not a setting of the opt family"):
        load_config(None, TINY_MODEL + ["model.num_kv_heads=2"])


def test_opt_setting_in_a_llama_config():
    assert "model.word_embed_proj_dim is not a setting of the llama family" in error(["model.word_embed_proj_dim=32"])


def test_family_that_disagrees_with_the_preset():
    with pytest.raises(ConfigError, match="model.family opt disagrees with model.preset llama-7b"):
        load_config(None, ["model.preset=llama-7b", "model.family=opt"])


def test_unknown_family():
    with pytest.raises(ConfigError, match="model.family: unknown model family 'gpt'; choose one of opt, llama"):
        load_config(None, TINY_MODEL + ["model.family=gpt"])


def test_preset_implies_the_family():
    cfg = load_config(None, ["model.preset=llama2-70b", "batch.seq_length=4096", "parallel.tensor=8"], world_size=8)
    assert type(cfg.shape).__name__ == "LlamaShape" and cfg.shape.kv_heads == 8
