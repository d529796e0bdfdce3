"""Exact resume: N steps, stop, resume in fresh processes, N more == 2N straight (fp32, PP=2, dropout on,
so the dropout RNG position, data position, optimizer, LR schedule and step counter must all survive).

Also at TP=2 with sequence parallelism (each TP rank draws the dropout of its own part of the sequence) and
attention dropout (megatron's model-parallel RNG), where the interrupted run recomputes the attention core
selectively and the straight one does not: equal results also show that the recompute replays the
attention-dropout mask of the forward exactly."""
import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics

N = 3
ARGS = TINY_MODEL + ["model.dropout=0.1", "data.synthetic=arithmetic",
                     "batch.global_batch_size=8", "batch.micro_batch_size=2", "optimizer.lr=0.003",
                     "optimizer.warmup_steps=2", f"optimizer.decay_steps={2 * N}", "train.tensorboard=false"]
PP2 = ["parallel.pipeline=2"]
TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.attention_dropout=0.1"]
LAYOUTS = {  # name: (overrides of both runs, of the straight run, of the interrupted run)
    "pp2": (PP2, [], []),
    "tp2-sp": (TP2_SP, ["parallel.recompute=none"], ["parallel.recompute=selective"]),
}


def train(run_dir, steps, extra=PP2):
    opt_ds("train", "-", *ARGS, *extra, f"train.steps={steps}", f"train.save_dir={run_dir}/ckpt",
           f"train.log_dir={run_dir}", nproc=2, timeout=180)
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """layout -> the train records of its uninterrupted 2N-step run, made on first use (the PP=2 one also
    serves test_dropout_is_active)."""
    runs = {}

    def straight_run(layout):
        if layout not in runs:
            both, straight_only, _ = LAYOUTS[layout]
            records = train(tmp_path_factory.mktemp(f"straight-{layout}"), 2 * N, both + straight_only)
            runs[layout] = [r for r in records if r["event"] == "train"]
        return runs[layout]
    return straight_run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, straight, layout):
    both, _, interrupted_only = LAYOUTS[layout]
    straight = straight(layout)
    train(tmp_path / "resumed", N, both + interrupted_only)
    records = train(tmp_path / "resumed", 2 * N, both + interrupted_only)
    resumed = [r for r in records if r["event"] == "train"]
    assert [r["event"] for r in records].count("resume") == 1
    assert [r["step"] for r in resumed] == list(range(1, 2 * N + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


def test_dropout_is_active(tmp_path, straight):
    """The resume test is only meaningful if dropout draws random numbers: same seed, dropout off, other loss
    (of the first step, which the PP=2 straight run shares: the LR schedule does not depend on train.steps)."""
    with_dropout = [r["loss"] for r in straight("pp2")[:1]]
    opt_ds("train", "-", *ARGS, *PP2, "train.steps=1", "model.dropout=0.0", f"train.log_dir={tmp_path}/b", nproc=2,
           timeout=120)
    without = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl", "train")]
    assert with_dropout != without
