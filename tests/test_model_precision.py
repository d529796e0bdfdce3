"""fp32, bf16 and fp16 (dynamic loss scaling) through DeepSpeed's config, with ZeRO-1 and PP=2."""
import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics


def train(tmp_path, dtype, *extra):
    opt_ds("train", "-", *TINY_MODEL, "parallel.pipeline=2", f"precision.dtype={dtype}", "data.synthetic=arithmetic",
           "optimizer.lr=0.003", "train.steps=10", "batch.global_batch_size=8", "batch.micro_batch_size=2",
           f"train.log_dir={tmp_path}", "train.tensorboard=false", *extra, nproc=2, timeout=240)
    return read_metrics(tmp_path / "metrics.jsonl", "train")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_trains(tmp_path, dtype):
    records = train(tmp_path, dtype)
    assert len(records) == 10
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert all(r["grad_norm"] is not None for r in records)


def test_fp16_dynamic_loss_scale_backs_off_on_overflow(tmp_path):
    """Start at a loss scale so high the fp16 gradients overflow: DeepSpeed must skip those steps, halve
    the scale, keep the LR schedule where it was, and then train normally."""
    records = train(tmp_path, "fp16", "precision.initial_scale_power=24", "precision.hysteresis=1")
    scales = [r["loss_scale"] for r in records]
    skipped = [r["skipped_steps"] for r in records]
    assert skipped[0] == 1 and scales[1] < scales[0], "an overflowing step must be skipped and the scale lowered"
    first_applied = skipped.index(skipped[-1])
    assert records[first_applied]["lr"] == records[0]["lr"], "skipped steps must not advance the LR schedule"
    assert scales[-1] < 2 ** 24 and records[-1]["loss"] < records[0]["loss"]
