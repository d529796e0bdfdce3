"""The shipped presets: every OPT and LLaMA size resolves at its intended world size, follows its paper's
recipe, and agrees with the DeepSpeed JSON shipped beside it."""
import json
from pathlib import Path

import pytest

from opt_ds.config import load_config
from opt_ds.config.shipped import SHIPPED_CONFIGS, shipped_config
from opt_ds.models.presets import PRESETS, family_of

CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
M = 2 ** 20
# The papers' recipes, to check ds_configs/ against (global batch in tokens, peak LR, TP degree): OPT paper
# table 1 and metaseq's opt_job_constants.py (TP as OPT trained); LLaMA table 2 and Llama 2 table 1 (TP: the
# shard count Meta released each size in).
PAPERS = {
    "opt-125m": (M // 2, 6.0e-4, 2), "opt-350m": (M // 2, 3.0e-4, 2), "opt-1.3b": (M, 2.0e-4, 2),
    "opt-2.7b": (M, 1.6e-4, 4), "opt-6.7b": (2 * M, 1.2e-4, 2), "opt-13b": (4 * M, 1.0e-4, 2),
    "opt-30b": (4 * M, 1.0e-4, 2), "opt-66b": (2 * M, 8.0e-5, 8), "opt-175b": (2 * M, 3.0e-5, 8),
    "llama-7b": (4 * M, 3.0e-4, 1), "llama-13b": (4 * M, 3.0e-4, 2), "llama-33b": (4 * M, 1.5e-4, 4),
    "llama-65b": (4 * M, 1.5e-4, 8), "llama2-70b": (4 * M, 1.5e-4, 8),
}


def intended_world_size(name):
    raw = load_config(CONFIGS / f"{name}.yaml").run.parallel
    return raw.tensor * raw.pipeline * raw.data


def test_every_preset_has_its_recipe_shipped():
    assert SHIPPED_CONFIGS == CONFIGS
    assert set(PAPERS) == set(PRESETS)
    assert [name for name in PRESETS if shipped_config(name) is None] == []


@pytest.mark.parametrize("name", PRESETS)
def test_preset_follows_the_paper(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", world_size=intended_world_size(name))
    batch_tokens, peak_lr, tensor_parallel = PAPERS[name]
    assert cfg.shape == PRESETS[name].shape
    assert cfg.run.optimizer.lr == pytest.approx(peak_lr)
    assert cfg.run.optimizer.betas == [0.9, 0.95] and cfg.run.optimizer.weight_decay == 0.1
    assert cfg.tensor == tensor_parallel
    tokens = cfg.run.batch.global_batch_size * cfg.run.batch.seq_length
    assert tokens == pytest.approx(batch_tokens, rel=0.04)
    if family_of(cfg.shape).name == "opt":
        assert cfg.layout.world_size <= 992
    else:   # LLaMA: cosine to 10 %, 2000 warmup steps, clipping 1.0; LLaMA-65B ran on 2048 A100s
        opt = cfg.run.optimizer
        assert (opt.schedule, opt.min_lr_ratio, opt.warmup_steps, opt.clip_grad) == ("cosine", 0.1, 2000, 1.0)
        assert cfg.layout.world_size <= 2048 and cfg.run.precision.dtype == "bf16"


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_deepspeed_json_is_the_generated_one(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", world_size=intended_world_size(name))
    shipped = json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text())
    assert shipped == cfg.deepspeed_config()


def test_pinning_a_json_that_no_longer_matches_fails(tmp_path):
    """A config that names a DeepSpeed JSON (relative to the YAML file) must still agree with it."""
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "ds.json").write_text((CONFIGS / "deepspeed" / "opt-125m.json").read_text())
    text = (CONFIGS / "opt-125m.yaml").read_text().replace("micro_batch_size: 2", "micro_batch_size: 1")
    edited = tmp_path / "opt-125m.yaml"
    edited.write_text(text + "deepspeed: deepspeed/ds.json\n")
    with pytest.raises(Exception, match="train_micro_batch_size_per_gpu=2 but the config gives 1"):
        load_config(edited, world_size=256)


def test_demo_llama_is_a_gqa_llama_at_tp2_pp2():
    cfg = load_config(CONFIGS / "demo-llama.yaml", world_size=4)
    assert type(cfg.shape).__name__ == "LlamaShape" and (cfg.shape.num_heads, cfg.shape.kv_heads) == (8, 2)
    assert (cfg.tensor, cfg.pipeline, cfg.data_parallel) == (2, 2, 1) and cfg.run.optimizer.schedule == "cosine"
