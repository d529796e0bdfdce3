"""Impossible configs fail before any process group exists, with one message naming the key and the fix."""
import json

import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds, torchrun
from opt_ds.config import ConfigError, load_config

BASE = TINY_MODEL + ["batch.global_batch_size=8", "batch.micro_batch_size=2"]


def error(overrides, world_size=None, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, BASE + overrides, world_size=world_size)
    return str(info.value)


def test_heads_not_divisible_by_tp():
    msg = error(["parallel.tensor=3"], world_size=3)
    assert "num_heads 4 is not divisible by parallel.tensor 3" in msg and "1, 2, 4" in msg


def test_fewer_layers_than_pipeline_stages():
    assert "num_layers 4 is fewer than parallel.pipeline 8 stages" in error(["parallel.pipeline=8"], world_size=8)


def test_world_size_is_not_tp_pp_dp():
    msg = error(["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=2"], world_size=6)
    assert "world size 6 != TP x PP x DP = 2 x 2 x 2 = 8" in msg and "launch 8 processes" in msg


def test_world_size_not_a_multiple_of_tp_pp():
    assert "world size 6 is not a multiple of TP x PP = 2 x 2" in error(
        ["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)


def test_global_batch_not_micro_times_accumulation_times_dp():
    msg = error(["batch.gradient_accumulation_steps=3"], world_size=2)
    assert "global_batch_size 8 != micro_batch_size 2 x gradient_accumulation_steps 3 x data-parallel degree 2 = 12" in msg


def test_global_batch_not_divisible():
    assert "global_batch_size 8 is not a multiple of micro_batch_size 2 x data-parallel degree 3" in error(
        [], world_size=3)


def test_unknown_key_suggests_the_right_one():
    msg = error(["parallel.tensr=2"])
    assert "unknown key 'parallel.tensr'" in msg and "did you mean 'tensor'" in msg


def test_unknown_section():
    assert "unknown key 'optimiser'" in error(["optimiser.lr=1"])


def test_wrong_type():
    assert "train.steps: expected an integer, got 'many'" in error(["train.steps=many"])


def test_vocab_not_divisible_by_tp():
    assert "vocab_size 511 is not divisible by parallel.tensor 2" in error(
        ["model.vocab_size=511", "parallel.tensor=2"], world_size=2)


def test_zero_stage_2_is_refused():
    assert "ZeRO stage 0 or 1 only" in error(["parallel.zero_stage=2"])


def test_seq_longer_than_positions():
    assert "seq_length 128 exceeds model.max_position_embeddings 64" in error(["batch.seq_length=128"])


def test_unknown_preset():
    assert "model.preset: unknown preset 'opt-7b'" in error(["model.preset=opt-7b"])


def test_deepspeed_json_that_disagrees(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "gradient_clipping": 1.0, "bf16": {"enabled": True}}))
    msg = error([f"deepspeed={ds}"])
    assert "train_batch_size=16 but the config gives 8 (batch.global_batch_size)" in msg
    assert "bf16.enabled=True but the config gives False (precision.dtype)" in msg
    assert "gradient_clipping" not in msg       # agrees, so not reported


def test_deepspeed_json_that_agrees(tmp_path):
    """Keys the config sets may be repeated; keys it does not know are added, nested ones too."""
    generated = load_config(None, BASE, world_size=1).deepspeed_config()
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7},
                              "comms_logger": {"enabled": True}}))
    cfg = load_config(None, BASE + [f"deepspeed={ds}"], world_size=1)
    ds.unlink()                         # read once, when the config is resolved
    merged = cfg.deepspeed_config()
    assert merged["comms_logger"] == {"enabled": True}
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7}
    assert {k: v for k, v in merged.items() if k not in ("comms_logger", "zero_optimization")} == \
        {k: v for k, v in generated.items() if k != "zero_optimization"}


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_cli_reports_one_line_without_traceback():
    proc = opt_ds("train", "-", *BASE, "parallel.tensor=3", check=False, timeout=60)
    assert proc.returncode == 2
    assert "opt-ds train: error: model.num_heads 4 is not divisible by parallel.tensor 3" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_launch_with_wrong_world_size_fails_before_process_groups(tmp_path):
    """3 ranks for a TP=2 x PP=2 config: every rank stops at config resolution, nothing hangs."""
    proc = torchrun(3, "--module", "opt_ds", "train", "-", *BASE, "parallel.tensor=2", "parallel.pipeline=2",
                    check=False, timeout=120)
    assert proc.returncode != 0
    assert "world size 3 is not a multiple of TP x PP = 2 x 2" in proc.stdout
    assert "opt_ds/config.py" not in proc.stdout, "our error must be one line, not a traceback (torchrun adds its own)"


def test_exponent_without_dot_is_a_number():
    """YAML 1.1 reads `1e-2` as a string; a learning rate written that way must still work."""
    assert load_config(None, BASE + ["optimizer.lr=1e-2"]).run.optimizer.lr == 0.01


def test_recompute_modes_and_the_full_recompute_interval():
    assert "parallel.recompute 'some': choose none, selective or full" in error(["parallel.recompute=some"])
    msg = error(["parallel.recompute=selective", "parallel.activation_checkpoint_interval=2"])
    assert "recomputes whole decoder layers, but parallel.recompute is selective" in msg
    old_style = load_config(None, BASE + ["parallel.activation_checkpoint_interval=2"]).deepspeed_config()
    full = load_config(None, BASE + ["parallel.recompute=full"]).deepspeed_config()
    assert old_style["pipeline"]["activation_checkpoint_interval"] == 2
    assert full["pipeline"]["activation_checkpoint_interval"] == 1


def test_sequence_parallel_needs_a_sequence_the_tp_degree_divides():
    msg = error(["parallel.tensor=2", "parallel.sequence_parallel=true", "batch.seq_length=33"], world_size=2)
    assert "batch.seq_length 33 is not divisible by parallel.tensor 2" in msg
    cfg = load_config(None, BASE + ["parallel.tensor=2", "parallel.sequence_parallel=true"], world_size=2)
    assert cfg.deepspeed_config()["pipeline"]["pipe_partitioned"] is False
